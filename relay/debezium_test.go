package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus/testutil"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// debeziumDDL is the outbox table of Debezium's outbox event router
// documentation, with one extra column for RELAY_HEADER_COLUMNS.
const debeziumDDL = `CREATE TABLE outboxevent (
  id uuid NOT NULL,
  aggregatetype varchar(255) NOT NULL,
  aggregateid varchar(255) NOT NULL,
  type varchar(255) NOT NULL,
  payload jsonb,
  tracingspancontext varchar(256),
  tenant_id text,
  PRIMARY KEY (id))`

const dbzTraceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

// newDebeziumEnv is an env whose relay reads a Debezium table that already
// held delivered rows, migrated as `migrate` does with RELAY_COLUMNS=debezium.
func newDebeziumEnv(t *testing.T, onPublished string) (e *env, delivered []string) {
	t.Helper()
	e = newEnv(t)
	ctx := context.Background()
	_, err := e.pool.Exec(ctx, debeziumDDL)
	must(t, err)
	for i := 0; i < 3; i++ {
		id := fmt.Sprintf("d0000000-0000-4000-8000-%012d", i)
		_, err := e.pool.Exec(ctx, `INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
			VALUES ($1, 'order', 'old', 'OrderCreated', '{}')`, id)
		must(t, err)
		delivered = append(delivered, id)
	}
	c, err := pgx.Connect(ctx, e.dbURL)
	must(t, err)
	_, err = migrations.Apply(ctx, c, migrations.Target{Schema: "public", Table: "outboxevent", Publication: "dbz_relay_pub",
		Layout: migrations.LayoutDebezium})
	c.Close(ctx)
	must(t, err)
	e.cfg.Table, e.cfg.Publication = "public.outboxevent", "dbz_relay_pub"
	e.cfg.ColumnsSpec, e.cfg.HeaderColumns = "debezium", "tenant_id"
	e.cfg.OnPublished = onPublished
	must(t, e.cfg.Validate())
	return e, delivered
}

// dbzRow is one row a test writes into the Debezium table.
type dbzRow struct {
	id, aggType, aggID, typ string
	payload, span, tenant   *string
}

func strp(s string) *string { return &s }

// dbzRows are n rows over 5 text aggregates, some with a span context, a
// tenant or no payload (a tombstone).
func dbzRows(first, n int) []dbzRow {
	var rows []dbzRow
	for i := first; i < first+n; i++ {
		r := dbzRow{id: fmt.Sprintf("e0000000-0000-4000-8000-%012d", i), aggType: "customer",
			aggID: fmt.Sprintf("customer-%d/ü", i%5), typ: "CustomerUpdated", payload: strp(fmt.Sprintf(`{"n": %d}`, i))}
		if i%3 == 0 {
			r.span = strp("#Wed Dec 02 10:00:00 UTC 2026\ntraceparent=" + dbzTraceparent + "\n")
		}
		if i%4 == 0 {
			r.tenant = strp(fmt.Sprintf("tenant-%d", i%2))
		}
		if i%17 == 0 {
			r.payload = nil
		}
		rows = append(rows, r)
	}
	return rows
}

// insertDbz writes rows in transactions of txSize.
func (e *env) insertDbz(rows []dbzRow, txSize int) []string {
	e.t.Helper()
	ctx := context.Background()
	var ids []string
	for i := 0; i < len(rows); i += txSize {
		tx, err := e.pool.Begin(ctx)
		must(e.t, err)
		for _, r := range rows[i:min(i+txSize, len(rows))] {
			_, err := tx.Exec(ctx, `INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload, tracingspancontext, tenant_id)
				VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)`, r.id, r.aggType, r.aggID, r.typ, r.payload, r.span, r.tenant)
			must(e.t, err)
			ids = append(ids, r.id)
		}
		must(e.t, tx.Commit(ctx))
	}
	return ids
}

// checkDbzMessages checks each received message against its row.
func (e *env) checkDbzMessages(rows []dbzRow, started time.Time) {
	e.t.Helper()
	byID := map[string]amqp.Delivery{}
	for _, d := range e.deliveries() {
		byID[d.MessageId] = d
	}
	for _, r := range rows {
		d, ok := byID[r.id]
		if !ok {
			e.t.Fatalf("row %s was not received", r.id)
		}
		if d.Type != r.typ || d.RoutingKey != r.aggType+"."+r.typ || d.Headers["aggregate_type"] != r.aggType ||
			d.Headers["aggregate_id"] != r.aggID {
			e.t.Fatalf("row %s: type %q, key %q, headers %v", r.id, d.Type, d.RoutingKey, d.Headers)
		}
		occurred, err := time.Parse(time.RFC3339Nano, fmt.Sprint(d.Headers["occurred_at"]))
		if err != nil || occurred.Before(started.Add(-time.Minute)) || occurred.After(time.Now().Add(time.Minute)) {
			e.t.Fatalf("row %s: occurred_at %v (%v), want about its commit time", r.id, d.Headers["occurred_at"], err)
		}
		if r.payload == nil {
			if len(d.Body) != 0 {
				e.t.Fatalf("tombstone %s has a body %q", r.id, d.Body)
			}
		} else if strings.ReplaceAll(string(d.Body), " ", "") != strings.ReplaceAll(*r.payload, " ", "") {
			e.t.Fatalf("row %s: body %q, want %q", r.id, d.Body, *r.payload)
		}
		if tp, ok := d.Headers["traceparent"]; (r.span != nil) != ok || (ok && tp != dbzTraceparent) {
			e.t.Fatalf("row %s: traceparent header %v, span context %v", r.id, tp, r.span)
		}
		if v, ok := d.Headers["tenant_id"]; (r.tenant != nil) != ok || (ok && v != *r.tenant) {
			e.t.Fatalf("row %s: tenant_id header %v, column %v", r.id, v, r.tenant)
		}
	}
}

// TestDebeziumTableSweepAndStream: a Debezium table, migrated in place,
// works end to end with RELAY_COLUMNS=debezium in both modes: the rows
// there before the migration count as delivered; the backlog written after
// it is swept, the rest streamed, each exactly once and in insert order;
// text aggregate ids, tombstones, Debezium's span context and a header
// column reach the message.
func TestDebeziumTableSweepAndStream(t *testing.T) {
	for _, mode := range []string{config.OnPublishedMark, config.OnPublishedDelete} {
		t.Run(mode, func(t *testing.T) {
			e, delivered := newDebeziumEnv(t, mode)
			started := time.Now()
			rows := dbzRows(0, 300)
			ids := e.insertDbz(rows[:200], 7) // before the slot: the sweep's
			r := e.start(nil)
			r.waitStreaming(t)
			ids = append(ids, e.insertDbz(rows[200:], 3)...)
			e.checkReceivedInOrder(ids)
			e.checkDbzMessages(rows, started)
			e.mu.Lock()
			defer e.mu.Unlock()
			for _, id := range delivered {
				if e.ids[id] != 0 {
					t.Fatalf("row %s, delivered by Debezium before the migration, was published", id)
				}
			}
			var left, marked int
			must(t, e.pool.QueryRow(context.Background(), `SELECT count(*), count(published_at) FROM outboxevent
				WHERE id <> ALL($1::uuid[])`, delivered).Scan(&left, &marked))
			switch {
			case mode == config.OnPublishedDelete && left != 0:
				t.Fatalf("%d rows left in delete mode", left)
			case mode == config.OnPublishedMark && (left != len(rows) || marked != len(rows)):
				t.Fatalf("%d rows, %d marked; want %d of each", left, marked, len(rows))
			}
		})
	}
}

// TestPreflightNamesMissingColumns: a mapping the table does not match, a
// header column it lacks, an id that is not a uuid, and a Debezium table
// not migrated each stop the relay before it publishes anything, with an
// error that names the column and what to do.
func TestPreflightNamesMissingColumns(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, err := e.pool.Exec(ctx, `CREATE TABLE textids (id text PRIMARY KEY, aggregate_type text, aggregate_id text, event_type text,
		payload jsonb, occurred_at timestamptz, published_at timestamptz, relay_seq bigint)`)
	must(t, err)
	_, err = e.pool.Exec(ctx, debeziumDDL)
	must(t, err)
	_, err = e.pool.Exec(ctx, `ALTER PUBLICATION outbox_relay_pub ADD TABLE textids, outboxevent`)
	must(t, err)
	e.insertTx([]event{newEvent("order", "created", `{}`)}, true, nil)
	for _, c := range []struct {
		table, columns, headers, want string
	}{
		{"public.outbox_events", "event_type=kind", "", `has no column kind (the event_type column): set RELAY_COLUMNS`},
		{"public.outbox_events", "debezium,occurred_at=ts", "", `has no column aggregatetype (the aggregate_type column), aggregateid (the aggregate_id column), type (the event_type column), ts (the occurred_at column)`},
		{"public.outbox_events", "", "tenant,region", `has no column tenant, region, named in RELAY_HEADER_COLUMNS`},
		{"public.textids", "", "", `the id column id of table public.textids is text; the relay needs a uuid`},
		{"public.outboxevent", "debezium", "", `has no published_at column`},
	} {
		e.cfg.Table, e.cfg.ColumnsSpec, e.cfg.HeaderColumns = c.table, c.columns, c.headers
		r := e.start(nil)
		var err error
		select {
		case err = <-r.done:
			r.done <- err
		case <-time.After(20 * time.Second):
			t.Fatalf("%s %q: the relay did not stop", c.table, c.columns)
		}
		if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("%s %q %q: err = %v, want it to say %s", c.table, c.columns, c.headers, err, c.want)
		}
		if strings.Contains(c.want, "published_at") && !strings.Contains(err.Error(), "outbox-relay migrate` with this RELAY_COLUMNS") {
			t.Fatalf("err = %v, want it to say to run migrate", err)
		}
	}
	if n := e.receivedCount(); n != 0 {
		t.Fatalf("%d events published by misconfigured relays", n)
	}
}

// TestRowsDeletedInTheirOwnTransaction: Debezium's users often delete each
// outbox row in the transaction that inserts it (the WAL has the insert;
// the table stays empty). Every event is still published once, in order,
// the slot moves on, and the marker finds the missing rows with one
// statement per batch, counted in a metric rather than a warning each.
func TestRowsDeletedInTheirOwnTransaction(t *testing.T) {
	for _, mode := range []string{config.OnPublishedMark, config.OnPublishedDelete} {
		t.Run(mode, func(t *testing.T) {
			e, _ := newDebeziumEnv(t, mode)
			r := e.start(nil)
			r.waitStreaming(t)
			ctx := context.Background()
			rows := dbzRows(1000, 400)
			var ids []string
			for i := 0; i < len(rows); i += 3 {
				tx, err := e.pool.Begin(ctx)
				must(t, err)
				for _, row := range rows[i:min(i+3, len(rows))] {
					_, err := tx.Exec(ctx, `INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
						VALUES ($1, $2, $3, $4, $5::jsonb)`, row.id, row.aggType, row.aggID, row.typ, row.payload)
					must(t, err)
					_, err = tx.Exec(ctx, `DELETE FROM outboxevent WHERE id = $1`, row.id)
					must(t, err)
					ids = append(ids, row.id)
				}
				must(t, tx.Commit(ctx))
			}
			lsn := e.currentLSN()
			e.checkReceivedInOrder(ids)
			waitFor(t, 30*time.Second, "the slot to pass the last commit", func() bool { return e.slotPast(lsn) })
			if n := testutil.ToFloat64(r.metrics.RowsDeletedBeforeMark); n != float64(len(ids)) {
				t.Fatalf("outbox_relay_rows_deleted_before_mark_total = %v, want %d", n, len(ids))
			}
		})
	}
}

// TestANewSlotForgetsDeletedThrough: deleted_through belongs to one slot's
// stream. Setting the sweep pending, which precedes every slot creation,
// clears it: a value restored from another cluster, whose LSNs mean
// nothing here, would count rows the application deleted as published.
func TestANewSlotForgetsDeletedThrough(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r := e.testSession().r
	read := func() *string {
		var v *string
		must(t, e.pool.QueryRow(ctx, `SELECT deleted_through::text FROM outbox_relay_slot_state WHERE slot_name = $1`, e.cfg.Slot).Scan(&v))
		return v
	}
	_, err := e.pool.Exec(ctx, `INSERT INTO outbox_relay_slot_state (slot_name, sweep_pending, deleted_through, deleted_through_event)
		VALUES ($1, false, 'FF/0', 3)`, e.cfg.Slot)
	must(t, err)
	must(t, r.setSweepPending(ctx, false))
	if v := read(); v == nil || *v != "FF/0" {
		t.Fatalf("the sweep's end cleared deleted_through: %v", v)
	}
	must(t, r.setSweepPending(ctx, true))
	if v := read(); v != nil {
		t.Fatalf("deleted_through = %s after a new slot's sweep began, want NULL", *v)
	}
}

// TestSettleKeepsOnlyACopyOfTheID: a settled item keeps its id for the
// marker and the carry, but not the allocation it shares with the event's
// text fields and header columns, which the in-flight budget no longer
// counts (6,000 carried ids of 60 kB header columns held 360 MB).
func TestSettleKeepsOnlyACopyOfTheID(t *testing.T) {
	cols := decoder.DefaultColumns
	cols.Headers = []string{"big"}
	s := func(v string) *string { return &v }
	ev := decoder.NewLayout(cols).EventFromRow(decoder.Row{ID: s("0b5a1c9e-6f1d-4b43-9d0a-3f2e7c1a8b11"),
		AggregateType: s("a"), AggregateID: s("b"), EventType: s("c"), Payload: s("{}"), OccurredAt: s("2026-12-02 10:00:00+00"),
		Headers: []*string{s(strings.Repeat("x", 60<<10))}})
	it := &item{ev: ev, bytes: eventBytes(&ev)}
	ss := &session{inflight: newBudget(1 << 20)}
	ss.inflight.acquire(it.bytes)
	ss.settle(it)
	if it.ev.ID != ev.ID || unsafe.StringData(it.ev.ID) == unsafe.StringData(ev.ID) {
		t.Fatal("the settled item's id still points into the event's text")
	}
}
