package sink

import (
	"fmt"

	amqp "github.com/rabbitmq/amqp091-go"
)

// AMQPModel is the RabbitMQ sink's shaping of messages without a
// connection: what Reject refuses, what DeadLetter sends, and what the
// broker would refuse of a publishing. The relay's simulator publishes
// through it, so that a fake broker judges the sink's real messages.
type AMQPModel struct{ r *RabbitMQ }

// NewAMQPModel shapes messages as a sink with cfg does, under RabbitMQ's
// default frame_max.
func NewAMQPModel(cfg RabbitMQConfig) AMQPModel { return AMQPModel{r: &RabbitMQ{cfg: cfg}} }

// Reject is RabbitMQ.Reject.
func (m AMQPModel) Reject(msg *Message) string { return m.r.Reject(msg) }

// Publishing is what RabbitMQ.Publish sends for msg.
func (m AMQPModel) Publishing(msg *Message) amqp.Publishing { return m.r.publishing(msg) }

// DeadLetter is what RabbitMQ.DeadLetter sends for msg.
func (m AMQPModel) DeadLetter(msg *Message, reason string) amqp.Publishing {
	return m.r.deadLetterPublishing(msg, reason)
}

// Refuses says why the broker, or amqp091 before it, would refuse pub: a
// shortstr property over 255 bytes, or a content header over frame_max.
// "" when it would take it.
func (m AMQPModel) Refuses(pub amqp.Publishing, routingKey string) string {
	for _, f := range []struct{ name, v string }{
		{"routing key", routingKey}, {"type", pub.Type}, {"message_id", pub.MessageId},
		{"content_type", pub.ContentType}, {"app_id", pub.AppId},
	} {
		if len(f.v) > maxShortString {
			return fmt.Sprintf("%s is %d bytes, over a shortstr", f.name, len(f.v))
		}
	}
	if size, limit := headerFrameSize(&pub), m.r.frameMax(); size > limit {
		return fmt.Sprintf("content header is %d bytes, over frame_max %d", size, limit)
	}
	if m.r.cfg.MaxMessageBytes > 0 && len(pub.Body) > m.r.cfg.MaxMessageBytes {
		return fmt.Sprintf("body is %d bytes, over the broker's maximum %d", len(pub.Body), m.r.cfg.MaxMessageBytes)
	}
	return ""
}
