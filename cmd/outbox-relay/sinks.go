package main

import (
	"context"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/sink"
)

// natsPublisher returns the NewPublisher of RELAY_SINK=nats (docs/sinks.md).
func natsPublisher(cfg *config.Config) (func(context.Context) (sink.Publisher, error), error) {
	subjects, err := cfg.NATSStreamSubjects()
	if err != nil {
		return nil, err
	}
	nc := sink.NATSConfig{
		URL:               cfg.NATSURL,
		Stream:            cfg.NATSStream,
		StreamSubjects:    subjects,
		DeadLetterStream:  cfg.NATSDeadLetterStream,
		DeadLetterSubject: cfg.NATSDeadLetterSubject,
		DuplicateWindow:   cfg.NATSDuplicateWindow,
		MaxMessageBytes:   cfg.MaxMessageBytes,
		// The relay's window bounds what is unconfirmed; slack for the
		// messages between the window and the confirm stage.
		MaxPending:        2*cfg.PublishWindow + 64,
		CloudEvents:       cfg.CloudEvents == config.CloudEventsBinary,
		CloudEventsSource: cfg.CloudEventsSourceAttr(),
	}
	return func(ctx context.Context) (sink.Publisher, error) {
		p, err := sink.DialNATS(ctx, nc)
		if err != nil {
			return nil, err
		}
		return p, nil
	}, nil
}
