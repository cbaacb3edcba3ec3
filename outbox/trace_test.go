package outbox_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/outbox"
)

type traceRow struct{ traceparent, tracestate *string }

func traceRows(t *testing.T, db *pgxpool.Pool, table string) []traceRow {
	t.Helper()
	rows, err := db.Query(context.Background(), `SELECT traceparent, tracestate FROM `+table+` ORDER BY ctid`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (traceRow, error) {
		var x traceRow
		return x, r.Scan(&x.traceparent, &x.tracestate)
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func str(p *string) string {
	if p == nil {
		return "NULL"
	}
	return *p
}

// TestOutboxStoresTraceContext: Insert stores the W3C trace context of the
// span in ctx in every event of the call (a span of the SDK, and one with a
// tracestate), and NULL without a span.
func TestOutboxStoresTraceContext(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(tracetest.NewInMemoryExporter()))
	defer tp.Shutdown(ctx) //nolint:errcheck // nothing to flush that matters

	sctx, span := tp.Tracer("producer").Start(ctx, "pay order")
	sc := span.SpanContext()
	if err := outbox.Insert(sctx, db, ev(0), ev(1)); err != nil {
		t.Fatal(err)
	}
	span.End()

	ts, err := trace.ParseTraceState("vendor=opaque,other=x")
	if err != nil {
		t.Fatal(err)
	}
	remote := sc.WithTraceState(ts).WithTraceFlags(0) // not sampled: stored as it is
	if err := outbox.Insert(trace.ContextWithRemoteSpanContext(ctx, remote), db, ev(2)); err != nil {
		t.Fatal(err)
	}
	if err := outbox.Insert(ctx, db, ev(3)); err != nil {
		t.Fatal(err)
	}
	// A context whose span context is not valid is no trace either.
	if err := outbox.Insert(trace.ContextWithSpanContext(ctx, trace.SpanContext{}), db, ev(4)); err != nil {
		t.Fatal(err)
	}

	sampled := "00-" + sc.TraceID().String() + "-" + sc.SpanID().String() + "-01"
	want := []traceRow{
		{&sampled, nil}, {&sampled, nil},
		{ptr("00-" + sc.TraceID().String() + "-" + sc.SpanID().String() + "-00"), ptr("vendor=opaque,other=x")},
		{nil, nil}, {nil, nil},
	}
	got := traceRows(t, db, "outbox_events")
	if len(got) != len(want) {
		t.Fatalf("%d rows, want %d", len(got), len(want))
	}
	for i := range want {
		if str(got[i].traceparent) != str(want[i].traceparent) || str(got[i].tracestate) != str(want[i].tracestate) {
			t.Errorf("row %d: traceparent %s tracestate %s, want %s and %s", i,
				str(got[i].traceparent), str(got[i].tracestate), str(want[i].traceparent), str(want[i].tracestate))
		}
	}
}

func ptr(s string) *string { return &s }

// TestOutboxWithoutTraceColumns: on a table that has not had migration 006,
// inserts without a span work as before, an insert with one fails with an
// error that names the migration, and a Writer made WithoutTraceContext
// ignores the span.
func TestOutboxWithoutTraceColumns(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	if _, err := db.Exec(ctx, `ALTER TABLE outbox_events DROP COLUMN traceparent, DROP COLUMN tracestate`); err != nil {
		t.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider()
	defer tp.Shutdown(ctx) //nolint:errcheck // no processor
	sctx, span := tp.Tracer("producer").Start(ctx, "pay order")
	defer span.End()

	if err := outbox.Insert(ctx, db, ev(0)); err != nil {
		t.Fatalf("insert without a span on a table without the trace columns: %v", err)
	}
	err := outbox.Insert(sctx, db, ev(1))
	if !errors.Is(err, outbox.ErrNoTraceColumns) || !strings.Contains(err.Error(), "006_trace_context") ||
		!strings.Contains(err.Error(), "outbox-relay migrate") {
		t.Fatalf("insert with a span: error %v, want ErrNoTraceColumns naming migration 006", err)
	}
	w, err := outbox.New("outbox_events", outbox.WithoutTraceContext())
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Insert(sctx, db, ev(2)); err != nil {
		t.Fatalf("WithoutTraceContext: %v", err)
	}
	if n := count(t, db); n != 2 {
		t.Fatalf("%d rows, want 2", n)
	}
}
