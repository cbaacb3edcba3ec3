package sink

import (
	"errors"
	"fmt"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Dead-letter queue types (RELAY_DEAD_LETTER_QUEUE_TYPE).
const (
	QueueClassic = "classic"
	QueueQuorum  = "quorum"
)

// queueArgs are the declare arguments of a queue of type typ. A classic
// queue is declared without x-queue-type, as before the setting existed,
// so that a queue declared then is equivalent.
func queueArgs(typ string) amqp.Table {
	if typ == QueueQuorum {
		return amqp.Table{"x-queue-type": QueueQuorum}
	}
	return nil
}

func otherQueueType(typ string) string {
	if typ == QueueQuorum {
		return QueueClassic
	}
	return QueueQuorum
}

// deadLetterQueueError explains a failed declare of the dead-letter queue
// in the terms of the relay's settings. RabbitMQ answers
// PRECONDITION_FAILED when the queue exists with other arguments, and
// NOT_FOUND when the node of a classic queue (a classic queue lives on one
// node) is down; in both cases every session fails the same way until an
// operator acts, so the error says what to do.
func (r *RabbitMQ) deadLetterQueueError(err error) error {
	dlq, typ := r.cfg.DeadLetterExchange, r.cfg.DeadLetterQueueType
	if typ == "" {
		typ = QueueClassic
	}
	var ae *amqp.Error
	if !errors.As(err, &ae) {
		return fmt.Errorf("declare dead-letter queue %q (%s): %w", dlq, typ, err)
	}
	switch ae.Code {
	case amqp.PreconditionFailed:
		other := otherQueueType(typ)
		if r.queueIs(dlq, other) {
			return fmt.Errorf("declare dead-letter queue %q: it exists as a %s queue and RELAY_DEAD_LETTER_QUEUE_TYPE is %s; "+
				"set RELAY_DEAD_LETTER_QUEUE_TYPE=%s to keep it, or move its messages elsewhere and delete it so that the relay "+
				"declares it as a %s queue (RabbitMQ cannot change a queue's type): %w", dlq, other, typ, other, typ, err)
		}
		return fmt.Errorf("declare dead-letter queue %q: it exists with arguments other than a durable %s queue's "+
			"(RELAY_DEAD_LETTER_QUEUE_TYPE=%s) and the relay's; delete it or declare it as such: %w", dlq, typ, typ, err)
	case amqp.NotFound:
		if typ == QueueClassic {
			return fmt.Errorf("declare dead-letter queue %q: its node is down or unreachable: a classic queue lives on one "+
				"node of a cluster, and while that node is down no session can declare it, so the relay publishes nothing; "+
				"bring the node back, or use RELAY_DEAD_LETTER_QUEUE_TYPE=quorum (a queue replicated over the cluster; "+
				"move the messages out of the classic queue and delete it first): %w", dlq, err)
		}
	}
	return fmt.Errorf("declare dead-letter queue %q (%s): %w", dlq, typ, err)
}

// queueIs reports whether the existing queue name is of type typ: a
// declare with typ's arguments, which changes nothing on an existing
// equivalent queue, succeeds. It runs only after the broker said the queue
// exists with other arguments.
func (r *RabbitMQ) queueIs(name, typ string) bool {
	ch, err := r.conn.Channel()
	if err != nil {
		return false
	}
	defer ch.Close()
	args := queueArgs(typ)
	if args == nil {
		args = amqp.Table{"x-queue-type": QueueClassic}
	}
	_, err = ch.QueueDeclare(name, true, false, false, false, args)
	return err == nil
}
