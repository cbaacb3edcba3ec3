package outbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

const aggID = "7d3c1e52-8a0b-4c8e-9f11-2b6a0d4e5f60"

// newDB returns a pool on a fresh migrated database.
func newDB(t *testing.T) *pgxpool.Pool {
	t.Helper()
	testenv.Integration(t)
	url := testenv.Postgres(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	_, err = migrations.Apply(ctx, conn, migrations.Target{Schema: "public", Table: "outbox_events", Publication: "outbox_relay_pub"})
	conn.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func count(t *testing.T, db *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), `SELECT count(*) FROM outbox_events`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func ev(i int) outbox.Event {
	return outbox.Event{AggregateType: "order", AggregateID: aggID, EventType: "created",
		Payload: json.RawMessage(fmt.Sprintf(`{"n": %d}`, i))}
}

// TestOutboxRollbackWritesNothing: the events share the caller's
// transaction, so a rollback removes them.
func TestOutboxRollbackWritesNothing(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	tx, err := db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.Insert(ctx, tx, ev(1), ev(2)); err != nil {
		t.Fatal(err)
	}
	var inTx int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM outbox_events`).Scan(&inTx); err != nil || inTx != 2 {
		t.Fatalf("inside the transaction: %d rows, %v", inTx, err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, db); n != 0 {
		t.Fatalf("%d rows after rollback, want 0", n)
	}
}

// TestOutboxCommitWritesRowsWithV7IDs: committed rows are there, with
// generated UUIDv7 ids that sort in insert order, given ids kept, the
// payload stored as JSON and occurred_at defaulted or kept.
func TestOutboxCommitWritesRowsWithV7IDs(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	given := outbox.NewID()
	at := time.Date(2024, 5, 1, 12, 30, 0, 123456000, time.UTC)
	events := []outbox.Event{ev(0), ev(1), ev(2)}
	events = append(events, outbox.Event{ID: given, AggregateType: "customer", AggregateID: strings.ToUpper(aggID),
		EventType: "renamed", Payload: json.RawMessage(`{"name": "Zoë"}`), OccurredAt: at})
	for i := 4; i < 50; i++ {
		events = append(events, ev(i))
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.Insert(ctx, tx, events...); err != nil {
		t.Fatal(err)
	}
	var now time.Time
	if err := tx.QueryRow(ctx, `SELECT now()`).Scan(&now); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	// The physical order of a fresh heap is the insert order.
	rows, err := db.Query(ctx, `SELECT id::text, aggregate_type, aggregate_id::text, event_type, payload::text, occurred_at
		FROM outbox_events ORDER BY ctid`)
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		id, aggType, aggID, evType, payload string
		at                                  time.Time
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.id, &x.aggType, &x.aggID, &x.evType, &x.payload, &x.at)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(events) {
		t.Fatalf("%d rows, want %d", len(got), len(events))
	}
	var generated []string
	for i, r := range got {
		if i == 3 {
			if r.id != given || r.aggType != "customer" || r.evType != "renamed" || r.payload != `{"name": "Zoë"}` || !r.at.Equal(at) {
				t.Fatalf("row 3 = %+v, want the given event", r)
			}
			continue
		}
		u, err := uuid.Parse(r.id)
		if err != nil || u.Version() != 7 {
			t.Fatalf("row %d: id %s is not a UUIDv7", i, r.id)
		}
		if want := fmt.Sprintf(`{"n": %d}`, i); r.payload != want || r.aggID != aggID || !r.at.Equal(now) {
			t.Fatalf("row %d = %+v, want payload %s, occurred_at now() %v", i, r, want, now)
		}
		generated = append(generated, r.id)
	}
	if !slices.IsSorted(generated) {
		t.Fatalf("generated ids do not sort in insert order: %v", generated)
	}
	// v7 ids carry their time: within the test's run.
	sec, nsec := uuid.Must(uuid.Parse(generated[0])).Time().UnixTime()
	if d := time.Since(time.Unix(sec, nsec)); d < 0 || d > time.Minute {
		t.Fatalf("first id's timestamp is %s ago", d)
	}
}

// TestOutboxValidation: invalid events are refused before anything is
// written, with errors that say what is wrong and which event.
func TestOutboxValidation(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	good := ev(0)
	cases := []struct {
		name string
		mod  func(*outbox.Event)
		want string
	}{
		{"empty aggregate_type", func(e *outbox.Event) { e.AggregateType = "" }, "aggregate_type is empty"},
		{"empty event_type", func(e *outbox.Event) { e.EventType = "" }, "event_type is empty"},
		{"bad aggregate_id", func(e *outbox.Event) { e.AggregateID = "order-42" }, `aggregate_id "order-42" is not a UUID`},
		{"bad id", func(e *outbox.Event) { e.ID = "42" }, `id "42" is not a UUID`},
		{"empty payload", func(e *outbox.Event) { e.Payload = nil }, "payload is empty"},
		{"invalid JSON", func(e *outbox.Event) { e.Payload = json.RawMessage(`{"a":`) }, "payload is not valid JSON"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bad := good
			c.mod(&bad)
			err := outbox.Insert(ctx, db, good, bad)
			if !errors.Is(err, outbox.ErrInvalid) || !strings.Contains(err.Error(), "event 1: ") || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want ErrInvalid naming event 1 with %q", err, c.want)
			}
		})
	}
	if n := count(t, db); n != 0 {
		t.Fatalf("%d rows written by invalid calls", n)
	}
	for _, v := range []any{make(chan int), math.NaN(), func() {}} {
		if _, err := outbox.JSON(v); !errors.Is(err, outbox.ErrInvalid) || !strings.Contains(err.Error(), "not serialisable") {
			t.Fatalf("JSON(%T) error %v, want ErrInvalid", v, err)
		}
	}
	if p, err := outbox.JSON(map[string]int{"a": 1}); err != nil || string(p) != `{"a":1}` {
		t.Fatalf("JSON = %s, %v", p, err)
	}
	// A database error (here a duplicate id) is returned, not hidden.
	dup := good
	dup.ID = outbox.NewID()
	if err := outbox.Insert(ctx, db, dup); err != nil {
		t.Fatal(err)
	}
	var pgErr *pgconn.PgError
	if err := outbox.Insert(ctx, db, dup); !errors.As(err, &pgErr) || pgErr.Code != "23505" {
		t.Fatalf("duplicate id: error %v, want unique_violation", err)
	}
	if _, err := outbox.New("a.b.c"); err == nil {
		t.Fatal(`New("a.b.c") accepted`)
	}
}

// countingExecer counts the statements sent.
type countingExecer struct {
	outbox.Execer
	n int
}

func (c *countingExecer) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	c.n++
	return c.Execer.Exec(ctx, sql, args...)
}

// TestOutboxBatchIsOneStatement: 1,000 events are one statement, fast,
// to a non-default table through a Writer.
func TestOutboxBatchIsOneStatement(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	if _, err := db.Exec(ctx, `CREATE SCHEMA app; CREATE TABLE app."Outbox" (LIKE public.outbox_events INCLUDING ALL)`); err != nil {
		t.Fatal(err)
	}
	w, err := outbox.New(`app.Outbox`)
	if err != nil {
		t.Fatal(err)
	}
	events := make([]outbox.Event, 1000)
	for i := range events {
		events[i] = ev(i)
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &countingExecer{Execer: tx}
	start := time.Now()
	if err := w.Insert(ctx, c, events...); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if c.n != 1 {
		t.Fatalf("%d statements for 1,000 events, want 1", c.n)
	}
	var n, distinct int
	if err := db.QueryRow(ctx, `SELECT count(*), count(DISTINCT id) FROM app."Outbox"`).Scan(&n, &distinct); err != nil {
		t.Fatal(err)
	}
	if n != 1000 || distinct != 1000 {
		t.Fatalf("%d rows (%d distinct ids), want 1000", n, distinct)
	}
	if took > 2*time.Second {
		t.Fatalf("1,000 events took %s", took)
	}
	t.Logf("1,000 events in one statement: %s", took)
}
