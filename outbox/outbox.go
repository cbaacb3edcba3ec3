package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// DefaultTable is the table Insert writes to, as `outbox-relay migrate`
// creates it (RELAY_TABLE's default).
const DefaultTable = "public.outbox_events"

// Event is one row of the outbox table.
type Event struct {
	// ID is the row id and the message id consumers deduplicate on. Empty:
	// a fresh UUIDv7.
	ID string
	// AggregateType and EventType must not be empty; the relay's default
	// routing key is "{aggregate_type}.{event_type}".
	AggregateType string
	// AggregateID is the aggregate's UUID.
	AggregateID string
	EventType   string
	// Payload is the event as JSON; JSON builds it from any value. It is
	// stored as jsonb, so key order and whitespace are not kept.
	Payload json.RawMessage
	// OccurredAt defaults to now(), the start of the transaction.
	OccurredAt time.Time
}

// Execer runs a statement: pgx.Tx, *pgx.Conn and *pgxpool.Pool satisfy it.
// Pass a transaction, so the event commits with the change it describes.
type Execer interface {
	Exec(ctx context.Context, sql string, arguments ...any) (pgconn.CommandTag, error)
}

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid outbox event")

// ErrNoTraceColumns is wrapped by the error of an Insert whose context
// carries a span while the table has no traceparent and tracestate columns:
// migration 006 (`outbox-relay migrate`) adds them. The failed statement
// aborts the caller's transaction, as any failed statement does; a Writer
// made with WithoutTraceContext never writes the columns.
var ErrNoTraceColumns = errors.New("the outbox table has no traceparent/tracestate columns: " +
	"run `outbox-relay migrate` (migration 006_trace_context adds them), or write with a Writer made with outbox.WithoutTraceContext()")

// Writer inserts events into one outbox table.
type Writer struct {
	insert      string // without the trace context columns
	insertTrace string // with them, $7 and $8
	noTrace     bool
}

// Option configures a Writer.
type Option func(*Writer)

// WithoutTraceContext makes the Writer ignore the span in the context and
// never write the traceparent and tracestate columns: for a table that has
// not had migration 006 yet.
func WithoutTraceContext() Option {
	return func(w *Writer) { w.noTrace = true }
}

// New returns a Writer for table, "schema.table" or "table" (schema public).
func New(table string, opts ...Option) (*Writer, error) {
	parts := strings.Split(table, ".")
	switch {
	case len(parts) == 1 && parts[0] != "":
		parts = []string{"public", parts[0]}
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
	default:
		return nil, fmt.Errorf("outbox: %q is not a table name of the form schema.table", table)
	}
	ident := pgx.Identifier(parts).Sanitize()
	// WITH ORDINALITY and ORDER BY keep the caller's order, which is the
	// order the relay publishes in.
	const from = `
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
	WITH ORDINALITY AS e(id, aggregate_type, aggregate_id, event_type, payload, occurred_at, n)
ORDER BY e.n`
	w := &Writer{
		insert: `INSERT INTO ` + ident + ` (id, aggregate_type, aggregate_id, event_type, payload, occurred_at)
SELECT e.id, e.aggregate_type, e.aggregate_id, e.event_type, e.payload::jsonb, coalesce(e.occurred_at, now())` + from,
		// One trace context for the whole call: the span in ctx.
		insertTrace: `INSERT INTO ` + ident + ` (id, aggregate_type, aggregate_id, event_type, payload, occurred_at, traceparent, tracestate)
SELECT e.id, e.aggregate_type, e.aggregate_id, e.event_type, e.payload::jsonb, coalesce(e.occurred_at, now()), $7::text, $8::text` + from,
	}
	for _, o := range opts {
		o(w)
	}
	return w, nil
}

var defaultWriter, _ = New(DefaultTable)

// Insert writes events into public.outbox_events with db, normally the
// caller's transaction. See Writer.Insert.
func Insert(ctx context.Context, db Execer, events ...Event) error {
	return defaultWriter.Insert(ctx, db, events...)
}

// Insert validates every event, then writes them all with one statement,
// in order. It writes nothing when any event is invalid; a database error
// (such as a duplicate id) aborts the caller's transaction, as any failed
// statement does.
//
// When ctx carries a valid span context (OpenTelemetry's, from
// trace.SpanContextFromContext), every event of the call gets its W3C
// traceparent and tracestate, formatted by the TraceContext propagator;
// otherwise the statement leaves those columns out and they stay NULL. On a
// table without the columns the error wraps ErrNoTraceColumns.
func (w *Writer) Insert(ctx context.Context, db Execer, events ...Event) error {
	if len(events) == 0 {
		return nil
	}
	n := len(events)
	ids := make([]string, n)
	aggTypes := make([]string, n)
	aggIDs := make([]string, n)
	evTypes := make([]string, n)
	payloads := make([]string, n)
	occurred := make([]pgtype.Timestamptz, n)
	for i := range events {
		ev := &events[i]
		if err := validate(ev); err != nil {
			return fmt.Errorf("outbox: event %d: %w", i, err)
		}
		if ev.ID == "" {
			ids[i] = NewID()
		} else {
			ids[i] = mustCanonical(ev.ID)
		}
		aggTypes[i] = ev.AggregateType
		aggIDs[i] = mustCanonical(ev.AggregateID)
		evTypes[i] = ev.EventType
		payloads[i] = string(ev.Payload)
		if !ev.OccurredAt.IsZero() {
			occurred[i] = pgtype.Timestamptz{Time: ev.OccurredAt, Valid: true}
		}
	}
	var tag pgconn.CommandTag
	var err error
	tc, traced := w.traceContext(ctx)
	if traced {
		tag, err = db.Exec(ctx, w.insertTrace, ids, aggTypes, aggIDs, evTypes, payloads, occurred, tc.traceparent, tc.tracestate)
	} else {
		tag, err = db.Exec(ctx, w.insert, ids, aggTypes, aggIDs, evTypes, payloads, occurred)
	}
	if err != nil {
		if traced && missingTraceColumn(err) {
			return fmt.Errorf("outbox: insert %d events: %w (%w)", n, ErrNoTraceColumns, err)
		}
		return fmt.Errorf("outbox: insert %d events: %w", n, err)
	}
	if tag.RowsAffected() != int64(n) {
		return fmt.Errorf("outbox: inserted %d of %d events", tag.RowsAffected(), n)
	}
	return nil
}

// traceCarrier receives what the TraceContext propagator writes.
type traceCarrier struct {
	traceparent string
	tracestate  pgtype.Text // NULL when empty
}

func (c *traceCarrier) Get(string) string { return "" }
func (c *traceCarrier) Keys() []string    { return nil }
func (c *traceCarrier) Set(key, value string) {
	switch key {
	case "traceparent":
		c.traceparent = value
	case "tracestate":
		c.tracestate = pgtype.Text{String: value, Valid: value != ""}
	}
}

// traceContext returns the W3C trace context of the span in ctx, if it has
// a valid one and w writes it.
func (w *Writer) traceContext(ctx context.Context) (traceCarrier, bool) {
	var c traceCarrier
	if w.noTrace || !trace.SpanContextFromContext(ctx).IsValid() {
		return c, false
	}
	propagation.TraceContext{}.Inject(ctx, &c)
	return c, c.traceparent != ""
}

// missingTraceColumn reports whether err is PostgreSQL's undefined_column
// for one of the trace context columns.
func missingTraceColumn(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42703" &&
		(strings.Contains(pgErr.Message, `"traceparent"`) || strings.Contains(pgErr.Message, `"tracestate"`))
}

func validate(ev *Event) error {
	if ev.AggregateType == "" {
		return fmt.Errorf("%w: aggregate_type is empty", ErrInvalid)
	}
	if ev.EventType == "" {
		return fmt.Errorf("%w: event_type is empty", ErrInvalid)
	}
	if _, err := uuid.Parse(ev.AggregateID); err != nil {
		return fmt.Errorf("%w: aggregate_id %q is not a UUID", ErrInvalid, ev.AggregateID)
	}
	if ev.ID != "" {
		if _, err := uuid.Parse(ev.ID); err != nil {
			return fmt.Errorf("%w: id %q is not a UUID", ErrInvalid, ev.ID)
		}
	}
	if len(ev.Payload) == 0 {
		return fmt.Errorf("%w: payload is empty (JSON null is written as json.RawMessage(\"null\"))", ErrInvalid)
	}
	if !json.Valid(ev.Payload) {
		return fmt.Errorf("%w: payload is not valid JSON", ErrInvalid)
	}
	return nil
}

// mustCanonical returns the hyphenated form of an id validate accepted
// (uuid.Parse also takes urn:uuid: and braces, which PostgreSQL does not).
func mustCanonical(s string) string {
	return uuid.MustParse(s).String()
}

// NewID returns a fresh UUIDv7: time-ordered, and monotonic within this
// process.
func NewID() string {
	return uuid.Must(uuid.NewV7()).String()
}

// JSON marshals v for Event.Payload; the error wraps ErrInvalid when v
// cannot be represented as JSON (channels, functions, NaN, cycles...).
func JSON(v any) (json.RawMessage, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("%w: payload is not serialisable as JSON: %w", ErrInvalid, err)
	}
	return b, nil
}
