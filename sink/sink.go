package sink

import (
	"context"
	"time"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// Message is one outbox event as a broker sees it.
type Message struct {
	ID            string // the row id: message_id, so consumers can deduplicate
	Key           string // routing key (or subject)
	Type          string // event_type
	AggregateType string
	AggregateID   string
	OccurredAt    time.Time
	Body          []byte // the payload JSON exactly as stored; empty for a tombstone
	// Tombstone: the row's payload was NULL; Body is empty and a header
	// says so.
	Tombstone bool
	// Traceparent and Tracestate are the producer's W3C trace context,
	// sent as headers of those names when not empty.
	Traceparent, Tracestate string
	// Headers are the row's RELAY_HEADER_COLUMNS, sent under their own names.
	Headers []decoder.Header
}

// Outcome is the broker's verdict on one message.
type Outcome uint8

const (
	// Acked: the broker took responsibility for the message.
	Acked Outcome = iota + 1
	// Nacked: the broker refused it; retry it. Unless Result.Permanent,
	// the refusal is about the destination, not the message, and clears.
	Nacked
	// Returned: no queue was bound for its routing key.
	Returned
)

func (o Outcome) String() string {
	switch o {
	case Acked:
		return "acked"
	case Nacked:
		return "nacked"
	case Returned:
		return "returned"
	}
	return "unknown"
}

// Result is the outcome of a publish, with the broker's reason if any.
type Result struct {
	Outcome Outcome
	Reason  string
	// Duplicate: the broker acked a message id it already held and did not
	// store it again (NATS JetStream's deduplication window).
	Duplicate bool
	// Permanent: a nack about the message itself, which the broker will
	// refuse every time (NATS: larger than the stream's maximum). A
	// RabbitMQ basic.nack never is: it carries no reason, and RabbitMQ
	// nacks for the state of a queue (a full queue with x-overflow
	// reject-publish, a queue process's internal error), which clears.
	Permanent bool
}

// Pending is a published message awaiting its confirmation.
type Pending interface {
	// Wait blocks until the broker's verdict or a connection failure.
	Wait(ctx context.Context) (Result, error)
}

// Publisher is what the relay needs from a broker.
type Publisher interface {
	// Publish sends m without waiting for its confirmation.
	Publish(ctx context.Context, m *Message) (Pending, error)
	// DeadLetter sends m to the dead-letter destination with the reason and
	// waits until the broker confirms it.
	DeadLetter(ctx context.Context, m *Message, reason string) error
	// Reject returns why m can never be accepted by this broker, or "".
	Reject(m *Message) string
	// Close releases the connection.
	Close() error
}
