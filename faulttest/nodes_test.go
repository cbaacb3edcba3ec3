//go:build faults

package faulttest

import (
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
)

// dialAny connects to the first of the world's RabbitMQ nodes that answers
// (amqpURL may list a cluster's nodes, comma-separated).
func (w *world) dialAny() (*amqp.Connection, error) {
	var err error
	for _, u := range strings.Split(w.amqpURL, ",") {
		var c *amqp.Connection
		if c, err = amqp.Dial(u); err == nil {
			return c, nil
		}
	}
	return nil, err
}
