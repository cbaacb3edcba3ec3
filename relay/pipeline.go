package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/sink"
)

// recv takes the next item; ok is false when in is closed or ctx ended.
func recv(ctx context.Context, in <-chan *item) (*item, bool, error) {
	select {
	case it, ok := <-in:
		return it, ok, nil
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

func forward(ctx context.Context, out chan<- *item, it *item) error {
	select {
	case out <- it:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// publish turns items into messages and publishes them without waiting.
// The pending channel holds at most RELAY_PUBLISH_WINDOW unconfirmed
// messages, which is what bounds the broker's side of memory.
//
// With a backlog, the publishes of all items already waiting go out in one
// write (sink.Batcher); the write is flushed whenever the publisher would
// wait, for items or for room in the window, so a lone event is sent at once.
func (s *session) publish(ctx context.Context) error {
	defer close(s.pending)
	batcher, _ := s.pub.(sink.Batcher)
	held := false
	flush := func() error {
		if !held {
			return nil
		}
		held = false
		if err := batcher.Flush(ctx); err != nil {
			return brokerFailure(err)
		}
		return nil
	}
	batch := make([]*item, 0, s.r.cfg.MarkBatchSize)
	for {
		var it *item
		var ok bool
		select {
		case it, ok = <-s.items:
		default:
			if err := flush(); err != nil {
				return err
			}
			var err error
			if it, ok, err = recv(ctx, s.items); err != nil {
				return err
			}
		}
		if !ok {
			return flush()
		}
		batch = append(batch[:0], it)
		if s.filtering && !it.sweep {
			batch = s.gatherReplay(batch)
			if err := flush(); err != nil {
				return err
			}
			if err := s.filterPublished(ctx, batch); err != nil {
				// Nothing of this batch is published yet: it is replayed.
				// What is already published is left to be confirmed.
				s.halt(err)
				return s.discard(ctx, batch)
			}
		}
		for i, it := range batch {
			if s.barrier != nil && s.needsBarrier(it, time.Now()) {
				// Publishes already held go out first; this one waits
				// until the synchronous standbys have its commit.
				if err := flush(); err != nil {
					return err
				}
				if err := s.awaitStandbys(ctx, it); err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					if errors.Is(err, errBarrierStopped) {
						// What was published drains; the rest is read
						// again by the next relay.
						return s.discard(ctx, batch[i:])
					}
					s.halt(err)
					return s.discard(ctx, batch[i:])
				}
			}
			if s.haltedWith() != nil {
				// What a failed session has read and not published is read
				// again by the next one: published now, it would be a
				// duplicate for another relay that takes the slot over.
				if err := flush(); err != nil {
					return err
				}
				return s.discard(ctx, batch[i:])
			}
			if batcher != nil && !held {
				batcher.Hold()
				held = true
			}
			if err := s.publishOne(ctx, it); err != nil {
				return err
			}
			select {
			case s.pending <- it:
				continue
			default:
			}
			if err := flush(); err != nil {
				abandonSpan(it, err)
				return err
			}
			if err := forward(ctx, s.pending, it); err != nil {
				abandonSpan(it, err)
				return err
			}
		}
	}
}

// discard drops the unpublished items of a halted session until the
// reader stops: the next session reads them again. Their bytes go back to
// the budget, which the reader may be waiting on.
func (s *session) discard(ctx context.Context, batch []*item) error {
	for _, it := range batch {
		s.inflight.release(it.bytes)
	}
	for {
		it, ok, err := recv(ctx, s.items)
		if err != nil || !ok {
			return err
		}
		s.inflight.release(it.bytes)
	}
}

// gatherReplay adds the stream items already waiting, so that one query
// checks many rows.
func (s *session) gatherReplay(batch []*item) []*item {
	for len(batch) < cap(batch) {
		select {
		case it, ok := <-s.items:
			if !ok {
				return batch
			}
			batch = append(batch, it)
			if it.sweep {
				return batch
			}
		default:
			return batch
		}
	}
	return batch
}

func (s *session) publishOne(ctx context.Context, it *item) error {
	ev := &it.ev
	switch {
	case it.fate == fateSkip:
		return nil
	case ev.Published:
		it.fate = fateSkip // inserted already published: nothing to do
		return nil
	}
	if s.r.carried.take(ev.ID) {
		it.fate = fateCarried // the broker has it already; only the mark is missing
		return nil
	}
	it.msg = sink.Message{
		ID:            ev.ID,
		Type:          ev.EventType,
		AggregateType: ev.AggregateType,
		AggregateID:   ev.AggregateID,
		OccurredAt:    ev.OccurredAt,
		Body:          ev.Payload,
		Tombstone:     ev.Tombstone,
		Traceparent:   ev.Traceparent,
		Tracestate:    ev.Tracestate,
		Headers:       ev.Headers,
	}
	if ev.Invalid != "" {
		it.fate, it.dead = fateDeadLetter, newDeadReason(deadInvalidRow, ev.Invalid)
		return nil
	}
	it.msg.Key = s.r.key.Render(ev.AggregateType, ev.EventType, ev.AggregateID)
	if reason := s.pub.Reject(&it.msg); reason != "" {
		it.fate, it.dead = fateDeadLetter, newDeadReason(deadRejected, reason)
		return nil
	}
	if s.r.opt.Tracer != nil {
		s.startSpan(ctx, it)
	}
	it.sentAt = time.Now()
	p, err := s.pub.Publish(ctx, &it.msg)
	if err != nil {
		abandonSpan(it, err)
		return brokerFailure(err)
	}
	it.pending = p
	return nil
}

// startSpan starts the relay's span for it, just before its publish: a
// producer span of a new trace, linked to the producer's span when the row
// carried its trace context. Not its child: the message keeps carrying the
// producer's traceparent, so the consumer continues the producer's trace,
// and the relay's spans are traces of their own that point to it.
//
// The span holds copies of the few strings it records, not the event's
// buffer, and never the payload.
func (s *session) startSpan(ctx context.Context, it *item) {
	m := &it.msg
	system := s.r.broker()
	key := strings.Clone(m.Key)
	dest := s.r.cfg.Exchange
	if system == config.SinkNATS {
		dest = key // the subject
	}
	attrs := make([]attribute.KeyValue, 0, 8)
	attrs = append(attrs,
		attribute.String("messaging.system", system),
		attribute.String("messaging.operation.type", "send"),
		attribute.String("messaging.destination.name", dest),
		attribute.String("messaging.message.id", strings.Clone(m.ID)),
		attribute.String("outbox.aggregate_type", strings.Clone(m.AggregateType)),
		attribute.String("outbox.aggregate_id", strings.Clone(m.AggregateID)),
		attribute.String("outbox.event_type", strings.Clone(m.Type)),
	)
	if system != config.SinkNATS {
		attrs = append(attrs, attribute.String("messaging.rabbitmq.destination.routing_key", key))
	}
	opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindProducer), trace.WithNewRoot(), trace.WithAttributes(attrs...)}
	if producer := producerSpanContext(m.Traceparent, strings.Clone(m.Tracestate)); producer.IsValid() {
		opts = append(opts, trace.WithLinks(trace.Link{SpanContext: producer}))
	}
	_, it.span = s.r.opt.Tracer.Start(ctx, dest+" publish", opts...)
}

// producerSpanContext parses the row's trace context with the W3C
// TraceContext propagator: invalid (no link) when there is none.
func producerSpanContext(traceparent, tracestate string) trace.SpanContext {
	if traceparent == "" {
		return trace.SpanContext{}
	}
	c := traceCarrier{traceparent: traceparent, tracestate: tracestate}
	return trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), c))
}

// traceCarrier hands the row's two values to the propagator.
type traceCarrier struct{ traceparent, tracestate string }

func (c traceCarrier) Get(key string) string {
	switch key {
	case "traceparent":
		return c.traceparent
	case "tracestate":
		return c.tracestate
	}
	return ""
}
func (c traceCarrier) Set(string, string) {}
func (c traceCarrier) Keys() []string     { return []string{"traceparent", "tracestate"} }

// endSpan ends the item's span with the broker's verdict: OK when acked,
// an error when the event was dead-lettered or dropped.
func endSpan(it *item) {
	switch it.fate {
	case fatePublish:
		it.span.SetStatus(codes.Ok, "")
	case fateDeadLetter:
		it.span.SetAttributes(attribute.String("outbox.dead_letter.class", it.dead.class))
		it.span.SetStatus(codes.Error, "dead-lettered: "+it.dead.text)
	case fateDropped:
		it.span.SetStatus(codes.Error, "unroutable: dropped (RELAY_UNROUTABLE=drop)")
	}
	it.span.End()
	it.span = nil
}

// abandonSpan ends the span of an item whose verdict will never come in
// this session: its row is not marked, and it is published again.
func abandonSpan(it *item, err error) {
	if it.span == nil {
		return
	}
	why := "abandoned before the broker's verdict; the event is published again"
	if err != nil {
		why += ": " + err.Error()
	}
	it.span.SetStatus(codes.Error, why)
	it.span.End()
	it.span = nil
}

// endAbandonedSpans ends the spans of the items published and never
// confirmed by a session that ended: those the confirmer had not taken
// (the one it held, and those the publisher held, are ended where they
// failed). Call it after the pipeline's goroutines have returned, when the
// publisher has closed pending.
func (s *session) endAbandonedSpans(err error) {
	if s.r.opt.Tracer == nil {
		return
	}
	for it := range s.pending {
		abandonSpan(it, err)
	}
}

// maxNacks is how often an event nacked for what it is (a permanent nack,
// sink.Result.Permanent) is republished before it is dead-lettered. Other
// nacks say nothing about the event and never dead-letter it: RabbitMQ
// nacks for the state of a queue (full under x-overflow reject-publish, a
// quorum queue whose leader is gone, an internal error), which clears. The
// event is republished with the session's backoff, and after maxNacks such
// nacks in a row the session ends and the next one, on a fresh connection
// and channel (the next node of a cluster), republishes everything
// unconfirmed in order: measured on RabbitMQ 3.10, a channel opened on the
// last node while the quorum queue's leader was killed nacked every
// republish for over a minute, long after a majority was back.
// (A quorum queue without a majority but with its channel intact sends no
// confirm at all until one is back, measured with 2 of 3 nodes stopped
// for 45 s: nothing, then every publish acked at once; the relay waits
// for it.)
const maxNacks = 5

// maxNackSessions is how many sessions in a row must end on maxNacks nacks
// of the same event, over Options.NackPoisonAfter (5 minutes) at least,
// before it is dead-lettered: every node in turn, far beyond a quorum
// queue's leader election (5 s in the cluster tests, where 10 sessions
// could end within 15 s: a count alone dead-lettered an event there).
const maxNackSessions = 10

// nackStreak counts the sessions in a row that ended on maxNacks nacks of
// one event, since when. Only the confirmer touches it, and sessions run
// one at a time.
type nackStreak struct {
	id       string
	sessions int
	first    time.Time
}

// note counts one more session ended on id's nacks and returns the count
// and how long the streak has lasted.
func (n *nackStreak) note(id string, now time.Time) (int, time.Duration) {
	if n.id != id {
		n.id, n.sessions, n.first = strings.Clone(id), 0, now
	}
	n.sessions++
	return n.sessions, now.Sub(n.first)
}

// clear forgets the streak of id, which the broker took after all.
func (n *nackStreak) clear(id string) {
	if n.id != "" && n.id == id {
		n.id, n.sessions = "", 0
	}
}

// errNackedInARow ends a session whose broker keeps nacking an event.
var errNackedInARow = errors.New("the broker nacked the event every time")

// confirm waits for each message's verdict in publish order and applies
// the policies for returned, nacked and poison events.
func (s *session) confirm(ctx context.Context) error {
	defer close(s.confirmed)
	m := s.r.m
	for {
		it, ok, err := recv(ctx, s.pending)
		if err != nil || !ok {
			return err
		}
		switch it.fate {
		case fateSkip, fateCarried:
		case fateDeadLetter:
			if err := s.deadLetter(ctx, it, it.dead); err != nil {
				return err
			}
		default:
			if err := s.await(ctx, it); err != nil {
				abandonSpan(it, err)
				return err
			}
			m.ConfirmSeconds.Observe(time.Since(it.sentAt).Seconds())
			if it.fate == fatePublish && !it.ev.OccurredAt.IsZero() {
				// The contract's end to end: occurred_at -> confirmed.
				m.DeliverySeconds.Observe(time.Since(it.ev.OccurredAt).Seconds())
			}
		}
		if it.span != nil {
			endSpan(it)
		}
		s.settle(it)
		if err := forward(ctx, s.confirmed, it); err != nil {
			s.unforwarded = it // confirmed: carried over, not published again
			return err
		}
	}
}

// settle releases an item's bytes once the broker's verdict is in
// (confirmed, dead-lettered, skipped or carried): the marker and the carry
// to the next session need only its id, so memory in flight is bounded by
// the budget, not by the events waiting to be marked.
func (s *session) settle(it *item) {
	s.inflight.release(it.bytes)
	it.bytes = 0
	// A copy: the id shares one allocation with the event's text fields
	// and header columns, which the budget no longer counts.
	it.ev = decoder.Event{ID: strings.Clone(it.ev.ID)}
	it.msg = sink.Message{}
	it.pending = nil // a NATS ack future keeps the message it published
}

// await resolves one published item: acked, or handled by policy. Retries
// share the session's backoff: the first retry of an item goes at once (the
// cause may be gone already), and only consecutive failures wait longer.
func (s *session) await(ctx context.Context, it *item) error {
	nacks, transient := 0, 0 // permanent nacks, and the others
	for attempt := 0; ; attempt++ {
		res, err := it.pending.Wait(ctx)
		if err != nil {
			return brokerFailure(err)
		}
		switch res.Outcome {
		case sink.Acked:
			s.retry.reset()
			s.r.nackStreak.clear(it.msg.ID)
			return nil
		case sink.Returned:
			switch s.r.cfg.Unroutable {
			case "dead-letter":
				return s.deadLetter(ctx, it, newDeadReason(deadUnroutable, res.Reason))
			case "drop":
				s.log.Warn().Str("id", it.msg.ID).Str("routing_key", it.msg.Key).
					Msg("the broker could not route this event (no queue or stream for it); dropped (RELAY_UNROUTABLE=drop)")
				s.r.m.Retries.WithLabelValues(s.r.broker(), "unroutable_dropped").Inc()
				it.fate = fateDropped
				return nil
			}
			if attempt == 0 {
				s.log.Warn().Str("id", it.msg.ID).Str("routing_key", it.msg.Key).
					Msg("the broker could not route this event (no queue or stream for it); retrying until it can (RELAY_UNROUTABLE=retry)")
			}
			s.r.m.Retries.WithLabelValues(s.r.broker(), "unroutable").Inc()
		case sink.Nacked:
			s.r.m.Retries.WithLabelValues(s.r.broker(), "nack").Inc()
			if !res.Permanent {
				transient++
				if transient >= maxNacks {
					n, since := s.r.nackStreak.note(it.msg.ID, time.Now())
					if n >= maxNackSessions && since >= s.r.opt.NackPoisonAfter {
						// Not a queue without a leader any more: every node,
						// for minutes. A message the queue can never take
						// (over its x-max-length-bytes, with reject-publish)
						// must not stall the stream.
						s.r.nackStreak.clear(it.msg.ID)
						return s.deadLetter(ctx, it, deadReason{class: deadNacked,
							text: fmt.Sprintf("nacked %d times in a row in each of %d sessions in a row, for %s: %s",
								transient, n, since.Round(time.Second), res.Reason)})
					}
					return brokerFailure(fmt.Errorf("%w (%d in a row: %s; not for anything in it, so not dead-lettered): "+
						"reconnecting, to republish it and everything after it on a fresh channel", errNackedInARow, transient, res.Reason))
				}
				s.log.Warn().Str("id", it.msg.ID).Int("nacks", transient).Str("reason", res.Reason).
					Msg("broker nacked the event (not for anything in it: a full or failing queue, or one without a leader); republishing")
				break
			}
			nacks++
			if nacks >= maxNacks {
				return s.deadLetter(ctx, it, deadReason{class: deadNacked, text: fmt.Sprintf("nacked %d times: %s", nacks, res.Reason)})
			}
			s.log.Warn().Str("id", it.msg.ID).Int("nacks", nacks).Str("reason", res.Reason).Msg("broker refused the event; republishing")
		}
		if it.span != nil {
			it.span.AddEvent("republish", trace.WithAttributes(attribute.String("outbox.outcome", res.Outcome.String())))
		}
		if attempt > 0 && !sleep(ctx, s.retry.next()) {
			return ctx.Err()
		}
		it.sentAt = time.Now()
		p, err := s.pub.Publish(ctx, &it.msg)
		if err != nil {
			return brokerFailure(err)
		}
		it.pending = p
	}
}

func (s *session) deadLetter(ctx context.Context, it *item, why deadReason) error {
	if err := s.pub.DeadLetter(ctx, &it.msg, why.text); err != nil {
		return brokerFailure(err)
	}
	it.fate, it.dead = fateDeadLetter, why
	s.r.m.DeadLettered.WithLabelValues(why.class).Inc()
	s.log.Error().Str("id", it.msg.ID).Str("reason", why.text).
		Msg("event dead-lettered; its row is marked and the stream moves on")
	return nil
}
