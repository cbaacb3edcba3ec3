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

// Writer inserts events into one outbox table.
type Writer struct {
	insert string
}

// New returns a Writer for table, "schema.table" or "table" (schema public).
func New(table string) (*Writer, error) {
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
	return &Writer{insert: `INSERT INTO ` + ident + ` (id, aggregate_type, aggregate_id, event_type, payload, occurred_at)
SELECT e.id, e.aggregate_type, e.aggregate_id, e.event_type, e.payload::jsonb, coalesce(e.occurred_at, now())
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
	WITH ORDINALITY AS e(id, aggregate_type, aggregate_id, event_type, payload, occurred_at, n)
ORDER BY e.n`}, nil
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
	tag, err := db.Exec(ctx, w.insert, ids, aggTypes, aggIDs, evTypes, payloads, occurred)
	if err != nil {
		return fmt.Errorf("outbox: insert %d events: %w", n, err)
	}
	if tag.RowsAffected() != int64(n) {
		return fmt.Errorf("outbox: inserted %d of %d events", tag.RowsAffected(), n)
	}
	return nil
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
