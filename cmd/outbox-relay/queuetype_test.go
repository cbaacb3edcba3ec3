package main

import (
	"errors"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// TestRunDeclaresTheDeadLetterQueueType: the binary passes
// RELAY_DEAD_LETTER_QUEUE_TYPE=quorum through to the declare of its
// dead-letter queue.
func TestRunDeclaresTheDeadLetterQueueType(t *testing.T) {
	e := newRelayEnv(t)
	e.migrate(t)
	p := start(t, with(e.vars(), "RELAY_DEAD_LETTER_QUEUE_TYPE", "quorum"), "run")
	if !p.waitOutput("connected to RabbitMQ node", 30*time.Second) {
		t.Fatal("the relay did not connect to RabbitMQ")
	}
	conn, err := amqp.Dial(e.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	declare := func(typ string) error {
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		_, err = ch.QueueDeclare(e.dlx, true, false, false, false, amqp.Table{"x-queue-type": typ})
		return err
	}
	if err := declare("quorum"); err != nil {
		t.Fatalf("the dead-letter queue is not a quorum queue: %v", err)
	}
	var ae *amqp.Error
	if err := declare("classic"); !errors.As(err, &ae) || ae.Code != amqp.PreconditionFailed {
		t.Fatalf("a declare as classic: %v, want PRECONDITION_FAILED", err)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(30 * time.Second); code != 0 {
		t.Fatalf("relay exited %d", code)
	}
}
