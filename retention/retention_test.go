package retention

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// newTable returns a pool on a fresh database with the outbox table in the
// given schema.
func newTable(t *testing.T, schema string) (*pgxpool.Pool, Table) {
	t.Helper()
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if schema != "public" {
		if _, err := conn.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
			t.Fatal(err)
		}
	}
	tbl := Table{Schema: schema, Name: "outbox_events"}
	if _, err := migrations.Apply(ctx, conn, migrations.Target{Schema: schema, Table: tbl.Name, Publication: "outbox_relay_pub"}); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool, tbl
}

// insert adds n rows; published is an age (published_at = now() - age) or
// "" for unpublished. occurred_at is 30 days ago for every row.
func insert(t *testing.T, pool *pgxpool.Pool, tbl Table, n int, published string) {
	t.Helper()
	pub := "NULL"
	if published != "" {
		pub = "now() - interval '" + published + "'"
	}
	q := fmt.Sprintf(`INSERT INTO %s (id, aggregate_type, aggregate_id, event_type, payload, occurred_at, published_at)
		SELECT gen_random_uuid(), 'order', gen_random_uuid(), 'created', '{"n":1}', now() - interval '30 days', %s
		FROM generate_series(1, $1)`, pgx.Identifier{tbl.Schema, tbl.Name}.Sanitize(), pub)
	if _, err := pool.Exec(t.Context(), q, n); err != nil {
		t.Fatal(err)
	}
}

type counts struct{ old, recent, unpublished int64 }

func count(t *testing.T, pool *pgxpool.Pool, tbl Table) counts {
	t.Helper()
	var c counts
	err := pool.QueryRow(t.Context(), `SELECT
			count(*) FILTER (WHERE published_at < now() - interval '7 days'),
			count(*) FILTER (WHERE published_at >= now() - interval '7 days'),
			count(*) FILTER (WHERE published_at IS NULL)
		FROM `+pgx.Identifier{tbl.Schema, tbl.Name}.Sanitize()).Scan(&c.old, &c.recent, &c.unpublished)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestPruneDeletesOnlyPublishedRowsOlderThanTheCutoff(t *testing.T) {
	pool, tbl := newTable(t, "public")
	insert(t, pool, tbl, 1234, "10 days")
	insert(t, pool, tbl, 300, "1 day")
	insert(t, pool, tbl, 200, "") // unpublished, occurred 30 days ago

	var calls []int64
	n, err := Prune(t.Context(), pool, tbl, 168*time.Hour, 100, func(d int64) { calls = append(calls, d) })
	if err != nil {
		t.Fatal(err)
	}
	if n != 1234 {
		t.Errorf("Prune deleted %d rows, want 1234", n)
	}
	if got, want := count(t, pool, tbl), (counts{0, 300, 200}); got != want {
		t.Errorf("after prune: %+v, want %+v", got, want)
	}
	if len(calls) < 12 || calls[len(calls)-1] != 1234 {
		t.Errorf("progress calls %v: want one per batch of 100 ending at 1234", calls)
	}
	for i := 1; i < len(calls); i++ {
		if calls[i] <= calls[i-1] {
			t.Errorf("progress not increasing: %v", calls)
			break
		}
	}

	// Nothing left to delete: a second prune is a no-op.
	n, err = Prune(t.Context(), pool, tbl, 168*time.Hour, 100, nil)
	if err != nil || n != 0 {
		t.Fatalf("second prune: %d, %v; want 0, nil", n, err)
	}
}

// Old rows spread through the table, with recent and unpublished rows
// between them and rows moved by an UPDATE, are all found; the schema name
// needs quoting.
func TestPruneFindsRowsAnywhereInTheTable(t *testing.T) {
	pool, tbl := newTable(t, "Odd Schema")
	insert(t, pool, tbl, 500, "10 days")
	insert(t, pool, tbl, 500, "1 day")
	insert(t, pool, tbl, 500, "10 days")
	insert(t, pool, tbl, 50, "")
	// Publishing an old unpublished row moves it (an UPDATE writes a new
	// tuple), as the relay's mark does.
	if _, err := pool.Exec(t.Context(), `UPDATE `+pgx.Identifier{tbl.Schema, tbl.Name}.Sanitize()+
		` SET published_at = now() - interval '9 days' WHERE id IN (SELECT id FROM `+
		pgx.Identifier{tbl.Schema, tbl.Name}.Sanitize()+` WHERE published_at IS NULL LIMIT 10)`); err != nil {
		t.Fatal(err)
	}
	n, err := Prune(t.Context(), pool, tbl, 168*time.Hour, 64, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1010 {
		t.Errorf("Prune deleted %d rows, want 1010", n)
	}
	if got, want := count(t, pool, tbl), (counts{0, 500, 40}); got != want {
		t.Errorf("after prune: %+v, want %+v", got, want)
	}
}

// Cancelling mid-way stops between or inside a batch; what was deleted is
// whole batches, nothing unpublished or recent is touched, and a later
// prune finishes the job.
func TestPruneInterruptedLeavesAConsistentTable(t *testing.T) {
	pool, tbl := newTable(t, "public")
	insert(t, pool, tbl, 5000, "10 days")
	insert(t, pool, tbl, 100, "1 day")
	insert(t, pool, tbl, 100, "")

	ctx, cancel := context.WithCancel(t.Context())
	var seen []int64
	n, err := Prune(ctx, pool, tbl, 168*time.Hour, 50, func(d int64) {
		seen = append(seen, d)
		if len(seen) == 3 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted prune returned %d, %v; want context.Canceled", n, err)
	}
	if n != 150 {
		t.Errorf("interrupted prune reported %d deleted, want 150 (three whole batches)", n)
	}
	got := count(t, pool, tbl)
	if got.old != 5000-n || got.recent != 100 || got.unpublished != 100 {
		t.Errorf("after interruption: %+v, want old=%d recent=100 unpublished=100", got, 5000-n)
	}

	rest, err := Prune(t.Context(), pool, tbl, 168*time.Hour, 1000, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n+rest != 5000 {
		t.Errorf("deleted %d + %d, want 5000 in all", n, rest)
	}
	if got, want := count(t, pool, tbl), (counts{0, 100, 100}); got != want {
		t.Errorf("after the second prune: %+v, want %+v", got, want)
	}
}

// Cancelling while a DELETE runs rolls that batch back.
func TestPruneCancelledDuringAStatement(t *testing.T) {
	pool, tbl := newTable(t, "public")
	insert(t, pool, tbl, 200, "10 days")
	insert(t, pool, tbl, 20, "")

	// Hold a lock on one old row so the first DELETE blocks, then cancel.
	tx, err := pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(t.Context(), `SELECT 1 FROM outbox_events WHERE published_at IS NOT NULL LIMIT 1 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	n, err := Prune(ctx, pool, tbl, 168*time.Hour, 1000, nil)
	if !errors.Is(err, context.DeadlineExceeded) || n != 0 {
		t.Fatalf("blocked prune returned %d, %v; want 0, context.DeadlineExceeded", n, err)
	}
	if err := tx.Rollback(t.Context()); err != nil {
		t.Fatal(err)
	}
	// The client gave up, but the server may still run the DELETE it was
	// sent and commit it once the lock is free. Wait for it to finish: the
	// batch then either committed whole or not at all, and unpublished rows
	// are untouched either way.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var running int
		if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%DELETE FROM%' AND state = 'active'`).Scan(&running); err != nil {
			t.Fatal(err)
		}
		if running == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := count(t, pool, tbl)
	if got != (counts{200, 0, 20}) && got != (counts{0, 0, 20}) {
		t.Errorf("after the cancelled statement: %+v, want the batch whole or not at all, with 20 unpublished", got)
	}
}

func TestPruneRejectsBadArguments(t *testing.T) {
	if _, err := Prune(t.Context(), nil, Table{"public", "t"}, 0, 10, nil); err == nil {
		t.Error("olderThan 0 accepted")
	}
	if _, err := Prune(t.Context(), nil, Table{"public", "t"}, time.Hour, 0, nil); err == nil {
		t.Error("batch size 0 accepted")
	}
}

func TestRunPrunesAndStopsWithTheContext(t *testing.T) {
	pool, tbl := newTable(t, "public")
	insert(t, pool, tbl, 30, "10 days")
	insert(t, pool, tbl, 5, "")

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Run(ctx, pool, tbl, 168*time.Hour, 7, 50*time.Millisecond, zerolog.Nop())
	}()
	deadline := time.Now().Add(10 * time.Second)
	for count(t, pool, tbl).old != 0 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not prune within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Rows that become old later are pruned by a later pass.
	insert(t, pool, tbl, 3, "8 days")
	for count(t, pool, tbl).old != 0 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not prune the second group within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if got := count(t, pool, tbl).unpublished; got != 5 {
		t.Errorf("unpublished rows: %d, want 5", got)
	}
}
