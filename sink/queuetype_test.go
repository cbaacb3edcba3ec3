package sink

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// declareAs declares queue name with typ's arguments on a fresh channel,
// as an operator or an earlier relay would have.
func (rt *rabbitTest) declareAs(t *testing.T, name string, args amqp.Table) error {
	t.Helper()
	ch, err := rt.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	_, err = ch.QueueDeclare(name, true, false, false, false, args)
	return err
}

// TestRabbitMQDeadLetterQueueTypes: with quorum the relay's dead-letter
// queue is a quorum queue (a declare as classic is refused, one as quorum
// accepted) and a dead-letter copy reaches it; with classic (the default)
// it is declared as before, without x-queue-type.
func TestRabbitMQDeadLetterQueueTypes(t *testing.T) {
	for _, typ := range []string{QueueQuorum, QueueClassic, ""} {
		t.Run("type="+typ, func(t *testing.T) {
			rt := newRabbitTest(t)
			rt.cfg.DeadLetterQueueType = typ
			r := rt.dial(t)
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			m := testMessage("00000000-0000-4000-8000-000000000001", "order.created", `{"a":1}`)
			if err := r.DeadLetter(ctx, m, "test"); err != nil {
				t.Fatal(err)
			}
			d, ok := rt.get(t, rt.cfg.DeadLetterExchange)
			if !ok || d.MessageId != m.ID {
				t.Fatalf("dead-letter queue holds %v %q, want %s", ok, d.MessageId, m.ID)
			}
			want := typ
			if want == "" {
				want = QueueClassic
			}
			if err := rt.declareAs(t, rt.cfg.DeadLetterExchange, amqp.Table{"x-queue-type": want}); err != nil {
				t.Fatalf("the queue is not a %s queue: %v", want, err)
			}
			other := otherQueueType(want)
			err := rt.declareAs(t, rt.cfg.DeadLetterExchange, amqp.Table{"x-queue-type": other})
			var ae *amqp.Error
			if !errors.As(err, &ae) || ae.Code != amqp.PreconditionFailed {
				t.Fatalf("a declare as %s: %v, want PRECONDITION_FAILED", other, err)
			}
		})
	}
}

// TestRabbitMQDeadLetterQueueOfTheOtherType: a dead-letter queue that
// exists with the other type fails the dial with an error that names the
// queue, both types and the setting.
func TestRabbitMQDeadLetterQueueOfTheOtherType(t *testing.T) {
	for _, c := range []struct{ existing, configured string }{
		{QueueClassic, QueueQuorum}, {QueueQuorum, QueueClassic}, {QueueQuorum, ""},
	} {
		t.Run(c.existing+"_as_"+c.configured, func(t *testing.T) {
			rt := newRabbitTest(t)
			if err := rt.declareAs(t, rt.cfg.DeadLetterExchange, queueArgs(c.existing)); err != nil {
				t.Fatal(err)
			}
			rt.cfg.DeadLetterQueueType = c.configured
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			r, err := DialRabbitMQ(ctx, rt.cfg)
			if err == nil {
				r.Close()
				t.Fatalf("the relay accepted a %s dead-letter queue with RELAY_DEAD_LETTER_QUEUE_TYPE=%q", c.existing, c.configured)
			}
			t.Logf("dial: %v", err)
			configured := c.configured
			if configured == "" {
				configured = QueueClassic
			}
			msg := err.Error()
			for _, want := range []string{`"` + rt.cfg.DeadLetterExchange + `"`, "exists as a " + c.existing + " queue",
				"RELAY_DEAD_LETTER_QUEUE_TYPE is " + configured, "set RELAY_DEAD_LETTER_QUEUE_TYPE=" + c.existing, "delete it"} {
				if !strings.Contains(msg, want) {
					t.Errorf("the error does not say %q", want)
				}
			}
			var ae *amqp.Error
			if !errors.As(err, &ae) || ae.Code != amqp.PreconditionFailed {
				t.Errorf("the error does not wrap the broker's PRECONDITION_FAILED: %v", err)
			}
			// The probe for the existing type changed nothing: the queue is
			// still of its type.
			if err := rt.declareAs(t, rt.cfg.DeadLetterExchange, amqp.Table{"x-queue-type": c.existing}); err != nil {
				t.Fatalf("the queue is no longer %s: %v", c.existing, err)
			}
		})
	}
}

// TestDeadLetterQueueNodeDownNamesTheSetting: RabbitMQ's NOT_FOUND for a
// classic queue whose node is down (the text of RabbitMQ 3.10, measured on
// scripts/cluster.sh) becomes an error that names the cause and
// RELAY_DEAD_LETTER_QUEUE_TYPE=quorum; a quorum queue's NOT_FOUND does not
// point at the setting.
func TestDeadLetterQueueNodeDownNamesTheSetting(t *testing.T) {
	down := &amqp.Error{Code: amqp.NotFound, Server: true,
		Reason: "NOT_FOUND - home node 'hare2@localhost' of durable queue 'dlx' in vhost '/' is down or inaccessible"}
	r := &RabbitMQ{cfg: RabbitMQConfig{DeadLetterExchange: "dlx"}}
	err := r.deadLetterQueueError(down)
	for _, want := range []string{`"dlx"`, "node is down", "classic queue lives on one node", "RELAY_DEAD_LETTER_QUEUE_TYPE=quorum"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if !errors.Is(err, down) {
		t.Errorf("error %q does not wrap the broker's", err)
	}
	r.cfg.DeadLetterQueueType = QueueQuorum
	if err := r.deadLetterQueueError(down); strings.Contains(err.Error(), "RELAY_DEAD_LETTER_QUEUE_TYPE=quorum") {
		t.Errorf("a quorum queue's error points at quorum: %q", err)
	}
}
