package status

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/migrations"
)

func TestPollSetsTheDatabaseGauges(t *testing.T) {
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	slot := testenv.Slot(t, dbURL)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := migrations.Apply(ctx, conn, migrations.Target{Schema: "public", Table: "outbox_events", Publication: "outbox_relay_pub"}); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	m := metrics.New()

	// No slot, no rows: all zero.
	if err := PollOnce(ctx, pool, slot, "public", "outbox_events", "occurred_at", m); err != nil {
		t.Fatal(err)
	}
	if r, u, o := gauge(m.SlotWALRetained), gauge(m.Unpublished), gauge(m.OldestUnpublishd); r != 0 || u != 0 || o != 0 {
		t.Fatalf("empty: retained=%v unpublished=%v oldest=%v, want 0 0 0", r, u, o)
	}

	if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, occurred_at, published_at)
		SELECT gen_random_uuid(), 'order', gen_random_uuid(), 'created', '{}', now() - g * interval '1 minute',
			CASE WHEN g > 3 THEN now() END
		FROM generate_series(1, 10) g`); err != nil {
		t.Fatal(err)
	}

	pctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		Poll(pctx, pool, slot, "public", "outbox_events", "occurred_at", m, 20*time.Millisecond, zerolog.Nop())
	}()
	deadline := time.Now().Add(10 * time.Second)
	for gauge(m.Unpublished) != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("unpublished gauge %v after 10s, want 3", gauge(m.Unpublished))
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if o := gauge(m.OldestUnpublishd); o < 170 || o > 240 {
		t.Errorf("oldest unpublished age %vs, want about 180s", o)
	}
	if r := gauge(m.SlotWALRetained); r <= 0 {
		t.Errorf("WAL retained %v, want > 0 after writes past the slot's restart_lsn", r)
	}
	var limit string
	if err := pool.QueryRow(t.Context(), `SHOW max_slot_wal_keep_size`).Scan(&limit); err != nil {
		t.Fatal(err)
	}
	if s := gauge(m.SlotSafeWAL); (limit == "-1") != (s == -1) {
		t.Errorf("safe WAL gauge %v with max_slot_wal_keep_size = %s: want -1 exactly when there is no limit", s, limit)
	}
}

func TestPollOnceFailsOnAMissingTable(t *testing.T) {
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	pool, err := pgxpool.New(t.Context(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if err := PollOnce(t.Context(), pool, "x", "public", "nope", "occurred_at", metrics.New()); err == nil {
		t.Fatal("PollOnce on a missing table returned nil")
	}
}

func gauge(g prometheus.Gauge) float64 {
	var out dto.Metric
	if err := g.Write(&out); err != nil {
		panic(err)
	}
	return out.GetGauge().GetValue()
}
