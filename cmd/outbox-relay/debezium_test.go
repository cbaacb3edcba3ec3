package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"
)

// debeziumDDL is the outbox table from Debezium's outbox event router
// documentation.
const debeziumDDL = `CREATE TABLE outboxevent (
  id uuid NOT NULL,
  aggregatetype varchar(255) NOT NULL,
  aggregateid varchar(255) NOT NULL,
  type varchar(255) NOT NULL,
  payload jsonb,
  PRIMARY KEY (id))`

// columnsOf lists a table's columns with their types, in order.
func columnsOf(t *testing.T, conn *pgx.Conn, table string) []string {
	t.Helper()
	rows, err := conn.Query(context.Background(), `SELECT attname || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' not null' ELSE '' END
		FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, table)
	if err != nil {
		t.Fatal(err)
	}
	cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return cols
}

// orderConsumer records first deliveries in arrival order.
type orderConsumer struct {
	mu    sync.Mutex
	seen  map[string]int
	first []amqp.Delivery
}

func newOrderConsumer(t *testing.T, amqpURL, exchange string) *orderConsumer {
	t.Helper()
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err == nil {
		err = ch.QueueBind(q.Name, "#", exchange, false, nil)
	}
	var deliveries <-chan amqp.Delivery
	if err == nil {
		deliveries, err = ch.Consume(q.Name, "", true, true, false, false, nil)
	}
	if err != nil {
		t.Fatal(err)
	}
	c := &orderConsumer{seen: map[string]int{}}
	go func() {
		for d := range deliveries {
			c.mu.Lock()
			if c.seen[d.MessageId] == 0 {
				c.first = append(c.first, d)
			}
			c.seen[d.MessageId]++
			c.mu.Unlock()
		}
	}()
	return c
}

// TestDebeziumTableMigrateRunAndCrash is the path of a team coming from
// Debezium: its table (the documented DDL, with rows Debezium delivered)
// is migrated in place with RELAY_COLUMNS=debezium, which adds only what
// the relay needs. The relay then sweeps the rows written since, streams
// the rest while it is killed twice, and in the end every committed row
// arrived, in order per aggregate, with its text aggregate id, and none of
// the rows Debezium had delivered is published again.
//
// In delete mode the producer deletes each row in the transaction that
// inserts it, as many Debezium users do: the table stays empty, and the
// replays after each kill must still publish every event (a missing row is
// not a published one unless the relay deleted it: deleted_through).
func TestDebeziumTableMigrateRunAndCrash(t *testing.T) {
	t.Run("mark", func(t *testing.T) { debeziumMigrateRunAndCrash(t, "mark") })
	t.Run("delete, rows deleted by the producer", func(t *testing.T) { debeziumMigrateRunAndCrash(t, "delete") })
}

func debeziumMigrateRunAndCrash(t *testing.T, mode string) {
	e := newRelayEnv(t)
	conn := e.conn(t)
	ctx := context.Background()
	if _, err := conn.Exec(ctx, debeziumDDL); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
		SELECT gen_random_uuid(), 'order', 'delivered-' || i, 'OrderCreated', '{}' FROM generate_series(1, 5) i`); err != nil {
		t.Fatal(err)
	}
	before := columnsOf(t, conn, "outboxevent")
	vars := with(e.vars(), "RELAY_TABLE", "public.outboxevent", "RELAY_COLUMNS", "debezium", "RELAY_ON_PUBLISHED", mode,
		"RELAY_STATUS_INTERVAL", "100ms", "RELAY_BACKOFF_MIN", "50ms", "RELAY_BACKOFF_MAX", "1s")
	out, all, code := runBin(t, vars, time.Minute, "migrate")
	if code != 0 {
		t.Fatalf("migrate exited %d:\n%s", code, all)
	}
	after := columnsOf(t, conn, "outboxevent")
	if strings.Join(after[:len(before)], ", ") != strings.Join(before, ", ") {
		t.Fatalf("migrate changed the table's own columns:\n before %v\n after  %v", before, after)
	}
	if added := strings.Join(after[len(before):], ", "); added != "published_at timestamp with time zone, relay_seq bigint" {
		t.Fatalf("migrate added %q, want published_at and relay_seq only\n%s", added, out)
	}
	var unpublished int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM outboxevent WHERE published_at IS NULL`).Scan(&unpublished); err != nil || unpublished != 0 {
		t.Fatalf("rows Debezium delivered: %d unpublished (%v), want 0", unpublished, err)
	}
	if out2, all2, code := runBin(t, vars, time.Minute, "migrate"); code != 0 || !strings.Contains(out2, "up to date") {
		t.Fatalf("second migrate exited %d:\n%s", code, all2)
	}

	// Producer: transactions of 1-4 rows on 4 aggregates, each row
	// numbered per aggregate; some roll back.
	aggs := []string{"customer/α", "customer/β", "acct-7", "x"}
	var mu sync.Mutex
	committed := map[string]bool{}
	var next [4]int
	produce := func(n int, stop *atomic.Bool) {
		for i := 0; i < n && !stop.Load(); i++ {
			tx, err := conn.Begin(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			var ids []string
			mu.Lock()
			saved := next
			for j := 0; j <= i%4; j++ {
				a := (i + j) % 4
				var id string
				err = tx.QueryRow(ctx, `INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
					VALUES (gen_random_uuid(), 'customer', $1, 'Changed', jsonb_build_object('n', $2::int)) RETURNING id::text`,
					aggs[a], next[a]).Scan(&id)
				if err == nil && mode == "delete" {
					_, err = tx.Exec(ctx, `DELETE FROM outboxevent WHERE id = $1`, id)
				}
				if err != nil {
					break
				}
				next[a]++
				ids = append(ids, id)
			}
			if err == nil && i%9 == 4 {
				err = fmt.Errorf("rolled back on purpose")
			}
			if err != nil {
				next = saved
				mu.Unlock()
				_ = tx.Rollback(ctx)
				continue
			}
			if err := tx.Commit(ctx); err != nil {
				next = saved
				mu.Unlock()
				continue
			}
			for _, id := range ids {
				committed[id] = true
			}
			mu.Unlock()
			time.Sleep(3 * time.Millisecond)
		}
	}
	var never atomic.Bool
	produce(120, &never) // the backlog: the new slot's sweep publishes it
	if mode == "delete" {
		// Rows deleted before the relay's slot existed were in no table
		// and no slot: Debezium delivered them, or nobody could.
		mu.Lock()
		clear(committed)
		mu.Unlock()
	}
	c := newOrderConsumer(t, e.amqpURL, e.exchange)

	var stop atomic.Bool
	done := make(chan struct{})
	for round := 0; round < 2; round++ {
		p := start(t, vars, "run")
		if !p.waitOutput(`"message":"streaming"`, 30*time.Second) {
			t.Fatalf("relay did not stream:\n%s", p.all.String())
		}
		if round == 0 {
			// Once the slot exists: in delete mode, a row deleted before
			// was in no table and no slot.
			go func() { defer close(done); produce(1<<30, &stop) }()
		}
		time.Sleep(time.Duration(600+400*round) * time.Millisecond)
		p.signal(syscall.SIGKILL)
		p.wait(10 * time.Second)
	}
	p := start(t, vars, "run")
	time.Sleep(time.Second)
	stop.Store(true)
	<-done

	mu.Lock()
	want := len(committed)
	mu.Unlock()
	if !eventually(90*time.Second, func() bool {
		var n int
		_ = conn.QueryRow(ctx, `SELECT count(*) FROM outboxevent WHERE published_at IS NULL`).Scan(&n)
		c.mu.Lock()
		defer c.mu.Unlock()
		return n == 0 && len(c.first) >= want
	}) {
		c.mu.Lock()
		t.Fatalf("received %d of %d committed rows", len(c.first), want)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(30 * time.Second); code != 0 {
		t.Fatalf("relay exited %d after SIGTERM", code)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	last := map[string]int{}
	dups := 0
	for _, n := range c.seen {
		dups += n - 1
	}
	for _, d := range c.first {
		if !committed[d.MessageId] {
			t.Fatalf("message %s is no committed row (rolled back, or delivered by Debezium before the migration)", d.MessageId)
		}
		agg, _ := d.Headers["aggregate_id"].(string)
		var body struct{ N int }
		if err := json.Unmarshal(d.Body, &body); err != nil {
			t.Fatalf("message %s: body %q: %v", d.MessageId, d.Body, err)
		}
		if n, ok := last[agg]; ok && body.N != n+1 {
			t.Fatalf("aggregate %q: event %d arrived after %d", agg, body.N, n)
		}
		last[agg] = body.N
	}
	if len(c.first) != want {
		t.Fatalf("received %d distinct rows, want %d", len(c.first), want)
	}
	t.Logf("Debezium table, %s mode, SIGKILL x2: %d events, 0 lost, %d duplicated, in order on %d aggregates", mode, want, dups, len(last))
}

// TestMigrateAdoptsATableOfItsOwnLayout: with RELAY_COLUMNS mapping
// columns, migrate adopts an existing table (only published_at and
// relay_seq added, its own columns untouched, a timestamp without time
// zone as the event time), refuses to invent one that does not exist, and
// the relay then publishes from it.
func TestMigrateAdoptsATableOfItsOwnLayout(t *testing.T) {
	e := newRelayEnv(t)
	conn := e.conn(t)
	ctx := context.Background()
	mapping := "id=event_id,aggregate_type=stream,aggregate_id=stream_key,event_type=kind,payload=body,occurred_at=created_at"
	vars := with(e.vars(), "RELAY_TABLE", "public.app_events", "RELAY_COLUMNS", mapping)
	if out, all, code := runBin(t, vars, time.Minute, "migrate"); code != 1 || !strings.Contains(all, "table \"public\".\"app_events\" does not exist") {
		t.Fatalf("migrate without the table exited %d, want 1 naming it:\n%s%s", code, out, all)
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE app_events (event_id uuid PRIMARY KEY, stream text NOT NULL, stream_key text NOT NULL,
		kind text NOT NULL, body jsonb NOT NULL, created_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'utc'), note text)`); err != nil {
		t.Fatal(err)
	}
	before := columnsOf(t, conn, "app_events")
	if _, all, code := runBin(t, vars, time.Minute, "migrate"); code != 0 {
		t.Fatalf("migrate exited %d:\n%s", code, all)
	}
	after := columnsOf(t, conn, "app_events")
	if strings.Join(after[:len(before)], ", ") != strings.Join(before, ", ") ||
		strings.Join(after[len(before):], ", ") != "published_at timestamp with time zone, relay_seq bigint" {
		t.Fatalf("migrate changed the table:\n before %v\n after  %v", before, after)
	}
	c := newOrderConsumer(t, e.amqpURL, e.exchange)
	p := start(t, vars, "run")
	var id string
	if err := conn.QueryRow(ctx, `INSERT INTO app_events (event_id, stream, stream_key, kind, body)
		VALUES (gen_random_uuid(), 'invoice', 'INV-7', 'issued', '{"total": 3}') RETURNING event_id::text`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.seen[id] > 0 }) {
		t.Fatal("the event did not arrive")
	}
	p.signal(syscall.SIGTERM)
	p.wait(30 * time.Second)
	c.mu.Lock()
	defer c.mu.Unlock()
	d := c.first[0]
	occurred, err := time.Parse(time.RFC3339Nano, d.Headers["occurred_at"].(string))
	if d.Type != "issued" || d.RoutingKey != "invoice.issued" || d.Headers["aggregate_id"] != "INV-7" || err != nil ||
		time.Since(occurred).Abs() > time.Minute {
		t.Fatalf("message: type %q key %q headers %v (%v)", d.Type, d.RoutingKey, d.Headers, err)
	}
}
