package relay

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// producerSpan starts a span as an instrumented application would, in a
// trace whose tracestate the relay must carry too.
func producerSpan(t *testing.T) (context.Context, trace.Span) {
	t.Helper()
	ts, err := trace.ParseTraceState("vendor=opaque")
	must(t, err)
	upstream := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, byte(time.Now().UnixNano())},
		SpanID:  trace.SpanID{0, 0xf0, 0x67, 0xaa, 1, 2, 3, 4}, TraceFlags: trace.FlagsSampled, TraceState: ts, Remote: true,
	})
	tp := sdktrace.NewTracerProvider()
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	return tp.Tracer("shop").Start(trace.ContextWithRemoteSpanContext(context.Background(), upstream), "checkout")
}

// insertWith writes events with outbox.Insert in one transaction under ctx.
func (e *env) insertWith(ctx context.Context, events ...event) {
	e.t.Helper()
	tx, err := e.pool.Begin(ctx)
	must(e.t, err)
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit a no-op
	var batch []outbox.Event
	for _, ev := range events {
		batch = append(batch, outbox.Event{ID: ev.ID, AggregateType: ev.AggregateType, AggregateID: ev.AggregateID,
			EventType: ev.EventType, Payload: json.RawMessage(ev.Payload)})
	}
	must(e.t, outbox.Insert(ctx, tx, batch...))
	must(e.t, tx.Commit(ctx))
}

func traceparentOf(sc trace.SpanContext) string {
	return "00-" + sc.TraceID().String() + "-" + sc.SpanID().String() + "-" + sc.TraceFlags().String()
}

func spanAttr(s sdktrace.ReadOnlySpan, key string) string {
	for _, a := range s.Attributes() {
		if string(a.Key) == key {
			return a.Value.Emit()
		}
	}
	return ""
}

// checkTraceHeaders checks that d carries want's traceparent and
// tracestate, or neither when want is not valid.
func checkTraceHeaders(t *testing.T, d amqp.Delivery, want trace.SpanContext) {
	t.Helper()
	tp, hasTP := d.Headers["traceparent"]
	ts, hasTS := d.Headers["tracestate"]
	if !want.IsValid() {
		if hasTP || hasTS {
			t.Errorf("message %s: traceparent %v tracestate %v, want neither", d.MessageId, tp, ts)
		}
		return
	}
	if tp != traceparentOf(want) || ts != want.TraceState().String() {
		t.Errorf("message %s: traceparent %v tracestate %v, want %s and %s", d.MessageId, tp, ts,
			traceparentOf(want), want.TraceState().String())
	}
	if s, _ := tp.(string); len(s) > 35 && s[3:35] != want.TraceID().String() {
		t.Errorf("message %s: trace id %s, want the producer's %s", d.MessageId, s[3:35], want.TraceID())
	}
}

// TestTraceContextEndToEnd: a producer inserts inside a span with
// outbox.Insert; the consumer's message carries the producer's traceparent
// and tracestate, and the relay exports one producer span per event, in a
// trace of its own, linked to the producer's span; acked spans are OK, a
// dead-lettered one an error. Events written without a span carry no trace
// headers and their spans no link.
func TestTraceContextEndToEnd(t *testing.T) {
	e := newEnv(t)
	e.bindOnly("order.#") // invoice.* is unroutable: dead-lettered
	exporter := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exporter))
	defer tp.Shutdown(context.Background()) //nolint:errcheck // in memory

	// Streamed rows: the table sweep of a new slot reads no trace columns.
	r := e.startWith(func(r *Relay) { r.opt.Tracer = tp.Tracer("outbox-relay") }, nil)
	r.waitStreaming(t)
	ctx, span := producerSpan(t)
	producer := span.SpanContext()
	traced := []event{newEvent("order", "created", `{"n":1}`), newEvent("order", "paid", `{"n":2}`)}
	dead := newEvent("invoice", "sent", `{"n":3}`)
	e.insertWith(ctx, append(traced, dead)...)
	span.End()
	plain := newEvent("order", "shipped", `{"n":4}`)
	e.insertWith(context.Background(), plain)

	e.checkReceivedInOrder([]string{traced[0].ID, traced[1].ID, plain.ID})
	r.stop(t)

	for _, d := range e.deliveries() {
		want := producer
		if d.MessageId == plain.ID {
			want = trace.SpanContext{}
		}
		checkTraceHeaders(t, d, want)
	}
	dlq := e.dlq()
	if len(dlq) != 1 || dlq[0].MessageId != dead.ID {
		t.Fatalf("dead-letter queue holds %d messages, want %s", len(dlq), dead.ID)
	}
	checkTraceHeaders(t, dlq[0], producer)

	spans := exporter.GetSpans().Snapshots()
	byID := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		id := spanAttr(s, "messaging.message.id")
		if byID[id] != nil {
			t.Fatalf("two spans for message %s", id)
		}
		byID[id] = s
	}
	if len(spans) != 4 {
		t.Fatalf("%d spans, want one per event (4)", len(spans))
	}
	for _, ev := range append(append(traced, dead), plain) {
		s := byID[ev.ID]
		if s == nil {
			t.Fatalf("no span for %s", ev.ID)
		}
		if s.Name() != e.cfg.Exchange+" publish" || s.SpanKind() != trace.SpanKindProducer {
			t.Errorf("%s: span %q kind %v, want %q, producer", ev.ID, s.Name(), s.SpanKind(), e.cfg.Exchange+" publish")
		}
		for k, want := range map[string]string{
			"messaging.system": "rabbitmq", "messaging.destination.name": e.cfg.Exchange,
			"outbox.aggregate_type": ev.AggregateType, "outbox.aggregate_id": ev.AggregateID,
			"messaging.rabbitmq.destination.routing_key": ev.AggregateType + "." + ev.EventType,
		} {
			if got := spanAttr(s, k); got != want {
				t.Errorf("%s: %s = %q, want %q", ev.ID, k, got, want)
			}
		}
		if s.Parent().IsValid() || s.SpanContext().TraceID() == producer.TraceID() {
			t.Errorf("%s: the relay's span is in the producer's trace (parent %v); want a new trace with a link", ev.ID, s.Parent())
		}
		links := s.Links()
		if ev.ID == plain.ID {
			if len(links) != 0 {
				t.Errorf("%s: written without a span, but its span has links %v", ev.ID, links)
			}
		} else if len(links) != 1 || !links[0].SpanContext.Equal(producer.WithRemote(true)) {
			t.Errorf("%s: links %v, want exactly one, to the producer's span %v", ev.ID, links, producer)
		}
		want := codes.Ok
		if ev.ID == dead.ID {
			want = codes.Error
			if !strings.Contains(s.Status().Description, "dead-lettered") || spanAttr(s, "outbox.dead_letter.class") != deadUnroutable {
				t.Errorf("%s: status %v, class %q, want dead-lettered, unroutable", ev.ID, s.Status(), spanAttr(s, "outbox.dead_letter.class"))
			}
		}
		if s.Status().Code != want || s.EndTime().IsZero() {
			t.Errorf("%s: status %v (ended %v), want %v", ev.ID, s.Status(), !s.EndTime().IsZero(), want)
		}
	}
}

// TestTraceparentWithoutTracer: without a Tracer the relay starts no span,
// and the message still carries the producer's trace context.
func TestTraceparentWithoutTracer(t *testing.T) {
	e := newEnv(t)
	var tracer trace.Tracer
	r := e.startWith(func(r *Relay) { tracer = r.opt.Tracer }, nil)
	r.waitStreaming(t)
	ctx, span := producerSpan(t)
	ev := newEvent("order", "created", `{}`)
	e.insertWith(ctx, ev)
	span.End()
	e.checkReceivedInOrder([]string{ev.ID})
	r.stop(t)
	if tracer != nil {
		t.Fatalf("the harness's relay has a Tracer")
	}
	d := e.deliveries()
	checkTraceHeaders(t, d[0], span.SpanContext())
	if _, ok := d[0].Headers["traceparent"]; !ok {
		t.Fatal("no traceparent header")
	}
}

// failingVerdict loses the broker's verdict on one event of the first
// session, once every event has been published: the confirmer fails with
// events still waiting behind it.
type failingVerdict struct {
	sink.Publisher
	id        string
	all       int32
	published *atomic.Int32
	fired     *atomic.Bool
}

func (p failingVerdict) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	pend, err := p.Publisher.Publish(ctx, m)
	if err != nil {
		return pend, err
	}
	p.published.Add(1)
	if m.ID == p.id && p.fired.CompareAndSwap(false, true) {
		return lostVerdict(p), nil
	}
	return pend, nil
}

type lostVerdict failingVerdict

func (l lostVerdict) Wait(ctx context.Context) (sink.Result, error) {
	for l.published.Load() < l.all {
		if !sleep(ctx, 5*time.Millisecond) {
			return sink.Result{}, ctx.Err()
		}
	}
	return sink.Result{}, errors.New("test: connection lost before the verdict")
}

// TestTraceSpansOfAbandonedEventsEnd: when a session fails with events
// published and unconfirmed, their spans end too, as errors; the next
// session publishes them again with new spans, and in the end every event
// has exactly one OK span and every span started has ended.
func TestTraceSpansOfAbandonedEventsEnd(t *testing.T) {
	e := newEnv(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer tp.Shutdown(context.Background()) //nolint:errcheck // in memory

	events := make([]event, 20)
	ids := make([]string, len(events))
	for i := range events {
		events[i] = newEvent("order", "created", `{}`)
		ids[i] = events[i].ID
	}
	fv := failingVerdict{id: events[5].ID, all: int32(len(events)), published: new(atomic.Int32), fired: new(atomic.Bool)}
	r := e.startWith(func(r *Relay) { r.opt.Tracer = tp.Tracer("outbox-relay") }, func(p sink.Publisher) sink.Publisher {
		fv.Publisher = p
		return fv
	})
	r.waitStreaming(t)
	ctx, span := producerSpan(t)
	e.insertWith(ctx, events...)
	span.End()
	waitFor(t, 2*time.Minute, "all rows marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
	if !fv.fired.Load() {
		t.Fatal("the verdict was never lost")
	}

	ended := rec.Ended()
	if started := len(rec.Started()); started != len(ended) {
		t.Fatalf("%d spans started, %d ended", started, len(ended))
	}
	ok, abandoned := map[string]int{}, map[string]int{}
	for _, s := range ended {
		id := spanAttr(s, "messaging.message.id")
		switch {
		case s.Status().Code == codes.Ok:
			ok[id]++
		case s.Status().Code == codes.Error && strings.Contains(s.Status().Description, "abandoned"):
			abandoned[id]++
		default:
			t.Errorf("%s: status %v", id, s.Status())
		}
		if l := s.Links(); len(l) != 1 || l[0].SpanContext.TraceID() != span.SpanContext().TraceID() {
			t.Errorf("%s: links %v", id, l)
		}
	}
	for i, id := range ids {
		if ok[id] != 1 {
			t.Errorf("event %d: %d OK spans, want 1", i, ok[id])
		}
		// The events from the lost verdict on were published and never
		// confirmed in the first session.
		if want := i >= 5; (abandoned[id] > 0) != want {
			t.Errorf("event %d: %d abandoned spans, want some: %v", i, abandoned[id], want)
		}
	}
}

// startTraced is natsEnv.start with a Tracer.
func (ne *natsEnv) startTraced(tracer trace.Tracer) *running {
	t := ne.t
	t.Helper()
	replCfg, err := replication.Config(ne.dbURL, "outbox-relay-test")
	must(t, err)
	m := metrics.New()
	cfg, ncfg := *ne.cfg, ne.ncfg
	r, err := New(Options{
		Config: &cfg, Pool: ne.pool, Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
		Metrics: m, Replication: replCfg, StandbyRetry: 200 * time.Millisecond, Tracer: tracer,
		NewPublisher: func(ctx context.Context) (sink.Publisher, error) { return sink.DialNATS(ctx, ncfg) },
	})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	rr := &running{cancel: cancel, done: make(chan error, 1), metrics: m}
	go func() { rr.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-rr.done
		rr.done <- nil
	})
	return rr
}

// TestTraceContextNATS: on NATS too the message carries the producer's
// trace context as headers, and the relay's span, named after the subject,
// links to the producer's span.
func TestTraceContextNATS(t *testing.T) {
	ne := newNATSEnv(t)
	exporter := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exporter))
	defer tp.Shutdown(context.Background()) //nolint:errcheck // in memory
	r := ne.startTraced(tp.Tracer("outbox-relay"))
	r.waitStreaming(t)
	ctx, span := producerSpan(t)
	ev := newEvent("order", "created", `{}`)
	ne.insertWith(ctx, ev)
	span.End()
	ne.waitNATS(1, time.Minute)
	waitFor(t, time.Minute, "the row marked", func() bool { return ne.unpublished() == 0 })
	r.stop(t)

	producer := span.SpanContext()
	h := ne.received()[0].header
	if h.Get("traceparent") != traceparentOf(producer) || h.Get("tracestate") != producer.TraceState().String() {
		t.Errorf("NATS headers traceparent %q tracestate %q, want %s and %s", h.Get("traceparent"), h.Get("tracestate"),
			traceparentOf(producer), producer.TraceState().String())
	}
	spans := exporter.GetSpans().Snapshots()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want 1", len(spans))
	}
	s := spans[0]
	subject := ne.prefix + ".order.created"
	if s.Name() != subject+" publish" || spanAttr(s, "messaging.system") != "nats" ||
		spanAttr(s, "messaging.destination.name") != subject || spanAttr(s, "messaging.message.id") != ev.ID {
		t.Errorf("span %q with %v", s.Name(), s.Attributes())
	}
	if l := s.Links(); len(l) != 1 || !l[0].SpanContext.Equal(producer.WithRemote(true)) || s.Status().Code != codes.Ok {
		t.Errorf("links %v status %v, want one link to %v, OK", l, s.Status(), producer)
	}
}
