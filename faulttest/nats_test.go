//go:build faults

package faulttest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

// useNATS points the relay at NATS JetStream (unique stream and subjects)
// and counts what the stream holds, by Nats-Msg-Id, in w.seen.
func (w *world) useNATS() {
	t := w.t
	url := testenv.NATS(t)
	prefix := testenv.Name(t, "subj")
	cfg := &config.Config{
		Sink: config.SinkNATS, RoutingKey: prefix + ".{aggregate_type}.{event_type}",
		NATSStream: testenv.Name(t, "events"), NATSDeadLetterStream: testenv.Name(t, "dead"),
		NATSDeadLetterSubject: prefix + "_dead_letter.events", NATSDuplicateWindow: 2 * time.Minute,
	}
	subjects, err := cfg.NATSStreamSubjects()
	must(t, err)
	w.env = append(w.env, "RELAY_SINK=nats", "RELAY_NATS_URL="+url, "RELAY_ROUTING_KEY="+cfg.RoutingKey,
		"RELAY_NATS_STREAM="+cfg.NATSStream, "RELAY_NATS_DEAD_LETTER_STREAM="+cfg.NATSDeadLetterStream,
		"RELAY_NATS_DEAD_LETTER_SUBJECT="+cfg.NATSDeadLetterSubject)

	ctx := context.Background()
	// Create the streams as the relay would, so the consumer can start first.
	p, err := sink.DialNATS(ctx, sink.NATSConfig{URL: url, Stream: cfg.NATSStream, StreamSubjects: subjects,
		DeadLetterStream: cfg.NATSDeadLetterStream, DeadLetterSubject: cfg.NATSDeadLetterSubject,
		DuplicateWindow: cfg.NATSDuplicateWindow})
	must(t, err)
	p.Close()
	nc, err := nats.Connect(url)
	must(t, err)
	js, err := jetstream.New(nc)
	must(t, err)
	cons, err := js.OrderedConsumer(ctx, cfg.NATSStream, jetstream.OrderedConsumerConfig{})
	must(t, err)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		w.mu.Lock()
		w.seen[m.Headers().Get("Nats-Msg-Id")]++
		w.mu.Unlock()
		w.total.Add(1)
	})
	must(t, err)
	t.Cleanup(func() {
		cc.Stop()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, s := range []string{cfg.NATSStream, cfg.NATSDeadLetterStream} {
			if err := js.DeleteStream(ctx, s); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
				t.Errorf("delete stream %s: %v", s, err)
			}
		}
		nc.Close()
	})
}

// TestSIGKILLUnderLoadNATS is TestSIGKILLUnderLoad with the NATS JetStream
// sink. Nothing is lost, and JetStream's duplicate window (Nats-Msg-Id = row
// id) drops every replay: the stream holds each event exactly once.
func TestSIGKILLUnderLoadNATS(t *testing.T) {
	w := newWorld(t)
	w.useNATS()
	events, lost, dups := w.killRepeatedly(6)
	t.Logf("NATS, SIGKILL x6 under load: %d events, %d lost, %d duplicated in the stream", events, lost, dups)
	if dups != 0 {
		t.Fatalf("%d duplicates in the stream: JetStream deduplication by Nats-Msg-Id failed", dups)
	}
}
