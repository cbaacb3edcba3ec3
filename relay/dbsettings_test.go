package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/pgsession"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	relaystatus "github.com/outbox-relay/outbox-relay/status"
)

// strictDBA sets on the test's database what a strict DBA might, for every
// session that does not say otherwise, and gives the test a pool of its own
// that does say otherwise (the test is the application here).
func (e *env) strictDBA(settings map[string]string) {
	e.t.Helper()
	ctx := context.Background()
	var db string
	must(e.t, e.pool.QueryRow(ctx, `SELECT current_database()`).Scan(&db))
	for k, v := range settings {
		_, err := e.pool.Exec(ctx, `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` SET `+k+` = '`+v+`'`)
		must(e.t, err)
	}
	// The application's own settings, whatever the DBA set.
	pc, err := pgxpool.ParseConfig(e.dbURL)
	must(e.t, err)
	pc.ConnConfig.RuntimeParams["search_path"] = "public"
	pc.ConnConfig.RuntimeParams["statement_timeout"] = "0"
	pc.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = "0"
	pc.ConnConfig.RuntimeParams["lock_timeout"] = "0"
	pc.ConnConfig.RuntimeParams["default_transaction_read_only"] = "off"
	pc.ConnConfig.RuntimeParams["default_transaction_isolation"] = "read committed"
	pc.ConnConfig.RuntimeParams["idle_session_timeout"] = "0"
	pc.ConnConfig.RuntimeParams["synchronous_commit"] = "on"
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	must(e.t, err)
	e.pool.Close()
	e.pool = pool
	e.t.Cleanup(pool.Close)
	// Before the harness drops the slot and the database, in sessions that
	// would otherwise get these settings too.
	e.t.Cleanup(func() {
		if _, err := pool.Exec(context.Background(), `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` RESET ALL`); err != nil {
			e.t.Errorf("reset the database's settings: %v", err)
		}
	})
}

// TestDatabaseSettingsDoNotReachTheRelay (invariant 12): a database whose
// defaults would cancel the sweep (statement_timeout), kill its cursor and
// the marks' sessions (idle_in_transaction_session_timeout,
// idle_session_timeout), time out the marks (lock_timeout), refuse the
// marks (default_transaction_read_only) or make them fail on serialization
// (serializable) still has its whole backlog and its new events delivered
// in order and marked: the relay's sessions run under their own settings.
// The relay used to loop forever: cancelled sweeps, recreated slots,
// growing backoff, nothing delivered. `status` works there too.
func TestDatabaseSettingsDoNotReachTheRelay(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	e.strictDBA(map[string]string{
		"statement_timeout":                   "5ms",
		"idle_in_transaction_session_timeout": "200ms",
		"idle_session_timeout":                "1s",
		"lock_timeout":                        "50ms",
		"default_transaction_read_only":       "on",
		"default_transaction_isolation":       "serializable",
	})
	ctx := context.Background()
	// A backlog the slot will never deliver: one large transaction and many
	// smaller ones, numbered in insert order.
	insert := func(from, to int) {
		_, err := e.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
			SELECT ('00000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, 'bulk',
				('10000000-0000-4000-8000-' || lpad((i % 5)::text, 12, '0'))::uuid, 'loaded', jsonb_build_object('i', i)
			FROM generate_series($1::int, $2::int) AS i`, from, to)
		must(t, err)
	}
	insert(1, 20000)
	for i := 20001; i <= 30000; i += 2000 {
		insert(i, i+1999)
	}
	const backlog = 30000
	r := e.start(nil)
	r.waitStreaming(t)
	insert(backlog+1, backlog+100) // and through the stream
	const n = backlog + 100
	waitFor(t, 3*time.Minute, "every row marked", func() bool { return e.unpublished() == 0 })
	e.waitReceived(n, 30*time.Second)
	got := e.receivedIDs()
	for i := 0; i < n; i++ {
		if want := fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1); got[i] != want {
			t.Fatalf("message %d is %s, want %s", i, got[i], want)
		}
	}
	if len(got) != n {
		t.Fatalf("received %d messages, want %d", len(got), n)
	}

	// status, through a pool built as the binary builds it.
	pc, err := pgsession.PoolConfig(e.dbURL, 1, pgsession.Bounds{Statement: 30 * time.Second})
	must(t, err)
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	must(t, err)
	defer pool.Close()
	rep, err := relaystatus.Gather(ctx, pool, e.cfg.Slot, e.cfg.Publication, "public", "outbox_events", "occurred_at", 0, false)
	if err != nil {
		t.Fatalf("status under the strict settings: %v", err)
	}
	if rep.Unpublished != 0 {
		t.Fatalf("status reports %d unpublished rows, want 0", rep.Unpublished)
	}
	r.stop(t)
}

// TestSettingHintNamesTheSetting: an error caused by a setting says which,
// and what would work.
func TestSettingHintNamesTheSetting(t *testing.T) {
	e := newEnv(t)
	e.cfg.PostgresTimeout = 200 * time.Millisecond
	pc, err := pgsession.PoolConfig(e.dbURL, 1, pgsession.Bounds{Statement: e.cfg.PostgresTimeout})
	must(t, err)
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	must(t, err)
	defer pool.Close()
	_, err = pool.Exec(context.Background(), `SELECT pg_sleep(2)`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("pg_sleep(2) under a 200 ms bound: %v, want the server's statement timeout", err)
	}
	if hint := settingHint(classifyPg(err), e.cfg); !strings.Contains(hint, "statement_timeout") || !strings.Contains(hint, "RELAY_POSTGRES_TIMEOUT (200ms)") {
		t.Fatalf("hint %q does not name statement_timeout and RELAY_POSTGRES_TIMEOUT's value", hint)
	}
}

// TestSlotCreationSaysWhatItWaitsFor (invariant 12: whatever it waits for,
// it names): creating the slot waits for a transaction left open; /readyz
// and status name that transaction while it does, and once it ends the
// relay streams.
func TestSlotCreationSaysWhatItWaitsFor(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	open, err := e.pool.Begin(ctx)
	must(t, err)
	defer open.Rollback(ctx) //nolint:errcheck // committed below unless the test fails
	_, err = open.Exec(ctx, `INSERT INTO other (v) VALUES ('holds a transaction id')`)
	must(t, err)
	var pid int32
	must(t, open.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid))
	want := fmt.Sprintf("pid %d ", pid)

	r := e.start(nil)
	waitFor(t, 20*time.Second, "/readyz to name the open transaction", func() bool {
		return strings.Contains(r.metrics.Ready(), want)
	})
	t.Logf("/readyz: %s", r.metrics.Ready())
	rep, err := relaystatus.Gather(ctx, e.pool, e.cfg.Slot, e.cfg.Publication, "public", "outbox_events", "occurred_at", 0, false)
	must(t, err)
	named := false
	for _, b := range rep.SlotCreationWaitsFor {
		named = named || b.PID == pid
	}
	if !named {
		t.Fatalf("status lists %v as what slot creation waits for, want pid %d among them", rep.SlotCreationWaitsFor, pid)
	}
	must(t, open.Commit(ctx))
	r.waitStreaming(t)
	r.stop(t)
}

// TestStopWhileSlotCreationWaits (invariant 11): a stop while
// CREATE_REPLICATION_SLOT waits for an open transaction ends Run at once;
// the creation is cancelled on the server and leaves no slot behind.
func TestStopWhileSlotCreationWaits(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	open, err := e.pool.Begin(ctx)
	must(t, err)
	defer open.Rollback(ctx) //nolint:errcheck // rolled back at the end
	_, err = open.Exec(ctx, `INSERT INTO other (v) VALUES ('holds a transaction id')`)
	must(t, err)
	r := e.start(nil)
	waitFor(t, 20*time.Second, "slot creation to wait", func() bool {
		return strings.HasPrefix(r.metrics.Ready(), "creating replication slot")
	})
	began := time.Now()
	r.stop(t)
	if took := time.Since(began); took > 5*time.Second {
		t.Fatalf("Run took %s to return after the stop", took)
	}
	waitFor(t, 10*time.Second, "the cancelled creation to leave no slot", func() bool {
		var n int
		must(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, e.cfg.Slot).Scan(&n))
		return n == 0
	})
}

// TestTableWithoutRelaySeqSaysRunMigrate: a table not migrated to version
// 4 stops the relay before it streams with an error that says what to run,
// rather than a sweep that fails on every new slot.
func TestTableWithoutRelaySeqSaysRunMigrate(t *testing.T) {
	e := newEnv(t)
	_, err := e.pool.Exec(context.Background(), `ALTER TABLE outbox_events DROP COLUMN relay_seq`)
	must(t, err)
	r := e.start(nil)
	select {
	case err := <-r.done:
		r.done <- nil
		if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), "outbox-relay migrate") {
			t.Fatalf("Run returned %v, want a misconfiguration that says to run outbox-relay migrate", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the relay did not stop on a table without relay_seq")
	}
}

// TestProducersNeedOnlyInsert: after migration 004 a role that may only
// INSERT into the outbox still can (relay_seq's default needs no grant on
// its sequence), and its rows are numbered.
func TestProducersNeedOnlyInsert(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	role := pgx.Identifier{testenv.Name(t, "app")}.Sanitize()
	_, err := e.pool.Exec(ctx, `CREATE ROLE `+role+`; GRANT INSERT ON outbox_events TO `+role)
	must(t, err)
	t.Cleanup(func() {
		_, _ = e.pool.Exec(context.Background(), `DROP OWNED BY `+role+`; DROP ROLE `+role)
	})
	tx, err := e.pool.Begin(ctx)
	must(t, err)
	defer tx.Rollback(ctx) //nolint:errcheck // committed below
	_, err = tx.Exec(ctx, `SET LOCAL ROLE `+role)
	must(t, err)
	_, err = tx.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		VALUES (gen_random_uuid(), 'order', gen_random_uuid(), 'created', '{}')`)
	if err != nil {
		t.Fatalf("an INSERT-only role cannot insert into the outbox: %v", err)
	}
	must(t, tx.Commit(ctx))
	var numbered bool
	must(t, e.pool.QueryRow(ctx, `SELECT bool_and(relay_seq IS NOT NULL) FROM outbox_events`).Scan(&numbered))
	if !numbered {
		t.Fatal("a row inserted after migration 004 has no relay_seq")
	}
}
