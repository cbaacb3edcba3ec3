package relay

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/sink"
)

// gated holds every confirmation until the gate opens.
type gated struct {
	sink.Publisher
	mu   sync.Mutex
	open chan struct{}
}

func newGated(p sink.Publisher) *gated { return &gated{Publisher: p, open: make(chan struct{})} }

func (g *gated) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	p, err := g.Publisher.Publish(ctx, m)
	if err != nil {
		return nil, err
	}
	return gatedPending{p, g.open}, nil
}

type gatedPending struct {
	sink.Pending
	open chan struct{}
}

func (p gatedPending) Wait(ctx context.Context) (sink.Result, error) {
	select {
	case <-p.open:
	case <-ctx.Done():
		return sink.Result{}, ctx.Err()
	}
	return p.Pending.Wait(ctx)
}

// TestAckAfterDone (invariant 1): while the broker's confirms are held back,
// the slot is not acknowledged past the transaction, even though the events
// reached the broker; once confirmed and marked, it is.
func TestAckAfterDone(t *testing.T) {
	e := newEnv(t)
	var g *gated
	r := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	r.waitStreaming(t)
	// An idle relay follows the server's WAL end (invariant 6); on a busy
	// machine the walsender may take a while to get there, so wait for it
	// before the transaction rather than after.
	before := e.currentLSN()
	waitFor(t, 20*time.Second, "the idle slot to reach the WAL position before the transaction", func() bool { return e.slotPast(before) })
	e.insertTx([]event{newEvent("order", "created", `{}`), newEvent("order", "paid", `{}`)}, true, nil)
	after := e.currentLSN()

	e.waitReceived(2, 10*time.Second) // published, not yet confirmed to the relay
	// Keepalives and status updates run every 100 ms; give them time to
	// (wrongly) acknowledge.
	time.Sleep(time.Second)
	if e.slotPast(after) {
		t.Fatal("slot acknowledged past a transaction whose events were not confirmed")
	}
	if e.unpublished() != 2 {
		t.Fatal("rows marked before the broker confirmed them")
	}
	close(g.open)
	waitFor(t, 10*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot acknowledged after confirm and mark", func() bool { return e.slotPast(after) })
	r.stop(t)
}

// testSession builds a session around the env's pool for tests of single
// stages.
func (e *env) testSession() *session {
	key, err := config.ParseRoutingKey(e.cfg.RoutingKey)
	must(e.t, err)
	r := &Relay{opt: Options{Config: e.cfg, Pool: e.pool}, cfg: e.cfg, log: zerolog.New(zerolog.NewTestWriter(e.t)),
		m: metrics.New(), key: key, schema: "public", table: "outbox_events", tableIdent: `"public"."outbox_events"`,
		cols: decoder.DefaultColumns, layout: decoder.NewLayout(decoder.DefaultColumns), idCol: `"id"`}
	r.db = r
	return &session{r: r, log: r.log, tracker: checkpoint.New(0)}
}

// TestMarkWaitsForVisibility (invariant 5): a mark that reaches fewer rows
// than it was given retries the rest; the transaction is not done until
// every row is marked.
func TestMarkWaitsForVisibility(t *testing.T) {
	e := newEnv(t)
	s := e.testSession()
	ctx := context.Background()

	visible := newEvent("order", "created", `{}`)
	e.insertTx([]event{visible}, true, nil)
	// The second row's transaction is still open: its row is invisible to
	// the mark, as when the walsender is faster than the commit's visibility.
	late := newEvent("order", "paid", `{}`)
	open, err := e.pool.Begin(ctx)
	must(t, err)
	// On a failure, end the transaction so the database can be dropped.
	defer func() { _ = open.Rollback(ctx) }()
	_, err = open.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		VALUES ($1, $2, $3, $4, $5)`, late.ID, late.AggregateType, late.AggregateID, late.EventType, late.Payload)
	must(t, err)
	var xid int64
	must(t, open.QueryRow(ctx, `SELECT pg_current_xact_id()::text::bigint`).Scan(&xid))

	tx := s.tracker.Begin()
	items := []*item{
		{tx: tx, xid: 1, ev: decoder.Event{ID: visible.ID}},
		{tx: tx, xid: uint32(xid), ev: decoder.Event{ID: late.ID}},
	}
	s.tracker.Add(tx)
	s.tracker.Add(tx)
	s.tracker.Close(tx, pglogrepl.LSN(1000))

	done := make(chan error, 1)
	go func() { done <- s.markBatch(ctx, items) }()
	time.Sleep(500 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("markBatch returned (%v) while a row was not yet visible", err)
	default:
	}
	if s.tracker.Done() != 0 {
		t.Fatal("the transaction is done before its invisible row was marked")
	}
	must(t, open.Commit(ctx))
	select {
	case err := <-done:
		must(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("markBatch did not finish after the row became visible")
	}
	if e.unpublished() != 0 {
		t.Fatal("rows left unmarked")
	}
	if s.tracker.Done() != 1000 {
		t.Fatalf("done = %s after both rows were marked", s.tracker.Done())
	}
}

// TestMarkDoesNotStallOnDeletedRow: a row deleted after it was published
// (its transaction visible, the row gone) has nothing to mark; the relay
// moves on instead of retrying forever.
func TestMarkDoesNotStallOnDeletedRow(t *testing.T) {
	e := newEnv(t)
	s := e.testSession()
	ctx := context.Background()
	gone := newEvent("order", "created", `{}`)
	e.insertTx([]event{gone}, true, nil)
	var xid int64
	must(t, e.pool.QueryRow(ctx, `SELECT xmin::text::bigint FROM outbox_events WHERE id = $1`, gone.ID).Scan(&xid))
	_, err := e.pool.Exec(ctx, `DELETE FROM outbox_events WHERE id = $1`, gone.ID)
	must(t, err)
	tx := s.tracker.Begin()
	s.tracker.Add(tx)
	s.tracker.Close(tx, 500)
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	must(t, s.markBatch(c, []*item{{tx: tx, xid: uint32(xid), ev: decoder.Event{ID: gone.ID}}}))
	if s.tracker.Done() != 500 {
		t.Fatal("transaction not done after its deleted row was skipped")
	}
}

// TestReplaySkipsMarkedRows (invariant 4): rows already marked published
// when the stream replays them (a previous relay marked them but died
// before acknowledging) are not published again.
func TestReplaySkipsMarkedRows(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// The slot exists, as a previous relay left it.
	_, err := e.pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, e.cfg.Slot)
	must(t, err)
	var marked, fresh []event
	for i := 0; i < 30; i++ {
		marked = append(marked, newEvent("order", "created", `{}`))
	}
	for i := 0; i < 10; i++ {
		fresh = append(fresh, newEvent("order", "paid", `{}`))
	}
	e.insertTx(marked[:15], true, nil)
	e.insertTx(marked[15:], true, nil)
	e.insertTx(fresh, true, nil)
	// The previous relay published and marked the first 30.
	_, err = e.pool.Exec(ctx, `UPDATE outbox_events SET published_at = now() WHERE event_type = 'created'`)
	must(t, err)

	r := e.start(nil)
	e.waitReceived(10, 20*time.Second)
	time.Sleep(500 * time.Millisecond)
	got := e.receivedIDs()
	if len(got) != 10 {
		t.Fatalf("received %d messages, want the 10 unmarked ones only", len(got))
	}
	for i, w := range fresh {
		if got[i] != w.ID {
			t.Fatalf("message %d is %s, want %s", i, got[i], w.ID)
		}
	}
	waitFor(t, 10*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot past the replay", func() bool { return e.slotPast(e.currentLSN()) })
	r.stop(t)
}

// TestSweepPublishesRowsWrittenBeforeTheSlot (invariant 7): unpublished rows
// that predate the slot are published from the table, each once, before the
// stream's events; rows already published are left alone.
func TestSweepPublishesRowsWrittenBeforeTheSlot(t *testing.T) {
	e := newEnv(t)
	var old []event
	for i := 0; i < 2500; i++ {
		old = append(old, newEvent("legacy", "imported", `{"old":true}`))
	}
	e.insertTx(old, true, nil)
	done := newEvent("legacy", "done", `{}`)
	e.insertTx([]event{done}, true, nil)
	_, err := e.pool.Exec(context.Background(), `UPDATE outbox_events SET published_at = now() WHERE id = $1`, done.ID)
	must(t, err)

	r := e.start(nil)
	r.waitStreaming(t)
	newer := newEvent("order", "created", `{}`)
	e.insertTx([]event{newer}, true, nil)
	e.waitReceived(len(old)+1, 30*time.Second)
	time.Sleep(500 * time.Millisecond)
	got := e.receivedIDs()
	if len(got) != len(old)+1 {
		t.Fatalf("received %d messages, want %d (each old row once, plus the new one)", len(got), len(old)+1)
	}
	for i, w := range old {
		if got[i] != w.ID {
			t.Fatalf("message %d is %s, want %s", i, got[i], w.ID)
		}
	}
	if got[len(old)] != newer.ID {
		t.Fatal("the stream's event did not come after the swept rows")
	}
	var pending bool
	must(t, e.pool.QueryRow(context.Background(), `SELECT sweep_pending FROM outbox_relay_slot_state WHERE slot_name = $1`,
		e.cfg.Slot).Scan(&pending))
	if pending {
		t.Fatal("sweep still recorded as pending after it finished")
	}
	r.stop(t)
}

// TestInterruptedSweepIsRedone: a relay stopped during its first sweep
// leaves the sweep pending; the next start recreates the slot and sweeps
// again, so no pre-slot row is lost.
func TestInterruptedSweepIsRedone(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	ctx := context.Background()
	const n = 20000
	_, err := e.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'legacy', gen_random_uuid(), 'imported', '{}' FROM generate_series(1, $1)`, n)
	must(t, err)
	// Confirms are held back: nothing of the sweep finishes.
	r := e.start(func(p sink.Publisher) sink.Publisher { return newGated(p) })
	waitFor(t, 10*time.Second, "the sweep to start", func() bool { return e.receivedCount() > 0 })
	// Abandon the drain at once: nothing is confirmed.
	e.cfg.ShutdownTimeout = time.Millisecond
	r.cancel()
	<-r.done
	r.done <- nil
	e.cfg.ShutdownTimeout = 20 * time.Second
	var pending bool
	must(t, e.pool.QueryRow(ctx, `SELECT sweep_pending FROM outbox_relay_slot_state WHERE slot_name = $1`, e.cfg.Slot).Scan(&pending))
	if !pending {
		t.Fatal("interrupted sweep not recorded as pending")
	}
	r = e.start(nil)
	waitFor(t, 60*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
	// A confirm means the broker has the message, not that the consumer
	// has it yet: wait for delivery, then count.
	distinct := func() int {
		e.mu.Lock()
		defer e.mu.Unlock()
		return len(e.ids)
	}
	waitFor(t, 30*time.Second, fmt.Sprintf("all %d events at the consumer", n), func() bool { return distinct() >= n })
	if got := distinct(); got != n {
		t.Fatalf("%d distinct events received, want %d", got, n)
	}
}

// TestIdleOutboxDoesNotHoldWAL (invariant 6): with no outbox traffic but
// writes elsewhere in the database, the slot's confirmed position follows
// the server's WAL.
func TestIdleOutboxDoesNotHoldWAL(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	r.waitStreaming(t)
	ctx := context.Background()
	for i := 0; i < 20; i++ {
		_, err := e.pool.Exec(ctx, `INSERT INTO other (v) SELECT repeat('w', 500) FROM generate_series(1, 200)`)
		must(t, err)
	}
	target := e.currentLSN()
	waitFor(t, 20*time.Second, "the slot to follow WAL written by other tables", func() bool { return e.slotPast(target) })
	if e.receivedCount() != 0 {
		t.Fatal("messages published for writes to another table")
	}
	r.stop(t)
}

// TestPoisonEventsAreDeadLettered (invariant 8): an event the broker can
// never accept goes to the dead-letter exchange with the reason, its row is
// marked, and the events behind it flow on.
func TestPoisonEventsAreDeadLettered(t *testing.T) {
	e := newEnv(t)
	e.cfg.MaxMessageBytes = 4096
	r := e.start(nil)
	r.waitStreaming(t)
	longKey := newEvent(strings.Repeat("a", 300), "created", `{}`)
	tooBig := newEvent("order", "created", `{"pad":"`+strings.Repeat("x", 5000)+`"}`)
	fine := newEvent("order", "created", `{"ok":true}`)
	e.insertTx([]event{longKey, tooBig, fine}, true, nil)
	e.waitReceived(1, 20*time.Second)
	if got := e.receivedIDs(); got[0] != fine.ID {
		t.Fatalf("received %v, want only the healthy event", got)
	}
	waitFor(t, 10*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	dead := e.dlq()
	if len(dead) != 2 {
		t.Fatalf("dead-letter queue has %d messages, want 2", len(dead))
	}
	reasons := map[string]string{}
	for _, d := range dead {
		reasons[d.MessageId], _ = d.Headers["x-outbox-reason"].(string)
	}
	if !strings.Contains(reasons[longKey.ID], "routing key is") {
		t.Fatalf("reason for the long routing key: %q", reasons[longKey.ID])
	}
	if !strings.Contains(reasons[tooBig.ID], "RELAY_MAX_MESSAGE_BYTES") {
		t.Fatalf("reason for the oversized payload: %q", reasons[tooBig.ID])
	}
	r.stop(t)
}

// textFieldEvents are rows whose event_type and aggregate_type (both in
// the routing key {aggregate_type}.{event_type}) are 0, 1, 255, 256 and
// 10,000 bytes, and 70,000 and 200,000 (over the NATS header limit and
// RabbitMQ's frame_max), in ASCII and multibyte UTF-8, alone and together,
// plus values a NATS header cannot carry as they are. The ids are uuid
// columns, so their limits are tested in sink/ only.
func textFieldEvents() []event {
	text := func(n int, multibyte bool) string {
		if !multibyte {
			return strings.Repeat("a", n)
		}
		return strings.Repeat("日", n/3) + strings.Repeat("b", n%3)
	}
	var evs []event
	for _, n := range []int{0, 1, 255, 256, 10000, 70000, 200000} {
		for _, mb := range []bool{false, true} {
			evs = append(evs,
				newEvent("order", text(n, mb), `{}`),
				newEvent(text(n, mb), "created", `{}`),
				newEvent(text(n, mb), text(n, !mb), `{}`))
		}
	}
	for _, v := range []string{"a\nb", "a\r\nNats-Msg-Id: forged", " lead", "é", "tab\tinside"} {
		evs = append(evs, newEvent("order", v, `{}`), newEvent(v, "created", `{}`))
	}
	return evs
}

// TestPoisonTextFieldsAreDeadLettered (invariant 8): whatever the lengths
// and characters of event_type and aggregate_type, each row is either
// delivered as it is or dead-lettered with its reason; every row is
// marked and a later normal event is delivered: the stream moves on.
func TestPoisonTextFieldsAreDeadLettered(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	r.waitStreaming(t)
	evs := textFieldEvents()
	e.insertRaw(evs)
	last := newEvent("order", "created", `{"last":true}`)
	e.insertTx([]event{last}, true, nil)
	waitFor(t, 60*time.Second, "the event after the poison rows", func() bool {
		ids := e.receivedIDs()
		return len(ids) > 0 && ids[len(ids)-1] == last.ID
	})
	waitFor(t, 10*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	got := map[string]string{}
	for _, d := range e.deliveries() {
		got[d.MessageId] = "delivered"
		ev := find(evs, last, d.MessageId)
		if d.Type != ev.EventType || d.Headers["aggregate_type"] != ev.AggregateType {
			t.Fatalf("%s delivered with other values than its row's", d.MessageId)
		}
	}
	for _, d := range e.dlq() {
		if got[d.MessageId] != "" {
			t.Fatalf("%s both delivered and dead-lettered", d.MessageId)
		}
		reason, _ := d.Headers["x-outbox-reason"].(string)
		if !strings.HasPrefix(reason, "rejected: ") {
			t.Fatalf("%s dead-lettered with reason %q", d.MessageId, reason)
		}
		got[d.MessageId] = reason
	}
	for _, ev := range evs {
		switch {
		case got[ev.ID] == "":
			t.Fatalf("row %s (event_type %d bytes, aggregate_type %d bytes) neither delivered nor dead-lettered",
				ev.ID, len(ev.EventType), len(ev.AggregateType))
		case len(ev.EventType) > 255 && got[ev.ID] == "delivered",
			len(ev.AggregateType)+1+len(ev.EventType) > 255 && got[ev.ID] == "delivered":
			t.Fatalf("row %s delivered with a shortstr over 255 bytes", ev.ID)
		}
	}
	r.stop(t)
}

// insertRaw inserts events in one transaction with plain SQL: the table
// takes values (an empty event_type) that the producer package refuses.
func (e *env) insertRaw(evs []event) {
	e.t.Helper()
	var ids, aggTypes, aggIDs, evTypes, payloads []string
	for _, ev := range evs {
		ids, aggTypes, aggIDs = append(ids, ev.ID), append(aggTypes, ev.AggregateType), append(aggIDs, ev.AggregateID)
		evTypes, payloads = append(evTypes, ev.EventType), append(payloads, ev.Payload)
	}
	_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT i::uuid, t, a::uuid, et, p::jsonb FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
		WITH ORDINALITY AS u(i, t, a, et, p, n) ORDER BY n`, ids, aggTypes, aggIDs, evTypes, payloads)
	must(e.t, err)
}

// find returns the event with id among evs and extra.
func find(evs []event, extra event, id string) event {
	for _, ev := range evs {
		if ev.ID == id {
			return ev
		}
	}
	return extra
}

// TestUnroutableEventsFollowThePolicy: with no queue bound for a routing
// key, the default policy dead-letters the event (the broker acks an
// unroutable mandatory message; only the return tells).
func TestUnroutableEventsFollowThePolicy(t *testing.T) {
	e := newEnv(t)
	e.cfg.RoutingKey = "{aggregate_type}.{event_type}"
	e.bindOnly("order.*")
	r := e.start(nil)
	r.waitStreaming(t)
	nobody := newEvent("invoice", "created", `{}`)
	routed := newEvent("order", "created", `{}`)
	e.insertTx([]event{nobody, routed}, true, nil)
	e.waitReceived(1, 20*time.Second)
	waitFor(t, 10*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	dead := e.dlq()
	if len(dead) != 1 || dead[0].MessageId != nobody.ID {
		t.Fatalf("dead-letter queue: %d messages, want the unroutable event", len(dead))
	}
	if reason, _ := dead[0].Headers["x-outbox-reason"].(string); !strings.Contains(reason, "NO_ROUTE") {
		t.Fatalf("reason %q does not say NO_ROUTE", reason)
	}
	if got := e.receivedIDs(); len(got) != 1 || got[0] != routed.ID {
		t.Fatalf("consumer received %v", got)
	}
	r.stop(t)
}

// TestStandbyTakesOver: a second relay on the same slot stands by (55006)
// and takes over when the active one stops.
func TestStandbyTakesOver(t *testing.T) {
	e := newEnv(t)
	active := e.start(nil)
	active.waitStreaming(t)
	standby := e.start(nil)
	waitFor(t, 10*time.Second, "the second relay to stand by", func() bool {
		return strings.HasPrefix(standby.metrics.Ready(), "standby")
	})
	a := newEvent("order", "created", `{}`)
	e.insertTx([]event{a}, true, nil)
	e.waitReceived(1, 10*time.Second)
	active.stop(t)
	standby.waitStreaming(t)
	b := newEvent("order", "paid", `{}`)
	e.insertTx([]event{b}, true, nil)
	e.waitReceived(2, 10*time.Second)
	time.Sleep(300 * time.Millisecond)
	if got := e.receivedIDs(); len(got) != 2 || got[0] != a.ID || got[1] != b.ID {
		t.Fatalf("received %v", got)
	}
	standby.stop(t)
}

// nacking makes the broker refuse chosen events: each id is nacked the
// given number of times before it is really published; the ids in
// permanent are nacked for what they are (sink.Result.Permanent).
type nacking struct {
	sink.Publisher
	mu        sync.Mutex
	nacks     map[string]int
	permanent map[string]bool
}

func (n *nacking) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	n.mu.Lock()
	left := n.nacks[m.ID]
	if left > 0 {
		n.nacks[m.ID] = left - 1
	}
	permanent := n.permanent[m.ID]
	n.mu.Unlock()
	if left > 0 {
		return nacked{permanent: permanent}, nil
	}
	return n.Publisher.Publish(ctx, m)
}

type nacked struct{ permanent bool }

func (n nacked) Wait(context.Context) (sink.Result, error) {
	return sink.Result{Outcome: sink.Nacked, Reason: "test nack", Permanent: n.permanent}, nil
}

// TestNacksAreRetriedThenDeadLettered (invariant 8): a nack that says
// nothing about the event (RabbitMQ's basic.nack: a full or failing queue)
// is retried however often it comes, on a new session after maxNacks in a
// row, and the event delivered, never dead-lettered; an event nacked for
// what it is every time is dead-lettered after maxNacks, its row marked,
// and the stream moves on.
func TestNacksAreRetriedThenDeadLettered(t *testing.T) {
	e := newEnv(t)
	transient := newEvent("order", "created", `{"n":1}`)
	permanent := newEvent("order", "created", `{"n":2}`)
	after := newEvent("order", "paid", `{"n":3}`)
	n := &nacking{nacks: map[string]int{transient.ID: 2 * maxNacks, permanent.ID: 1000},
		permanent: map[string]bool{permanent.ID: true}}
	r := e.start(func(p sink.Publisher) sink.Publisher { n.Publisher = p; return n })
	r.waitStreaming(t)
	e.insertTx([]event{transient, permanent, after}, true, nil)
	e.waitReceived(2, 30*time.Second)
	waitFor(t, 30*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	// A nacked event is republished after the events behind it (the one
	// documented exception to order), so compare as a set; the session
	// ended by the nacks republishes the event behind too.
	var got []string
	for _, id := range e.receivedIDs() {
		if !slices.Contains(got, id) {
			got = append(got, id)
		}
	}
	if len(got) != 2 || !((got[0] == transient.ID && got[1] == after.ID) || (got[0] == after.ID && got[1] == transient.ID)) {
		t.Fatalf("received %v, want the transiently nacked event and the one behind", got)
	}
	n.mu.Lock()
	left := n.nacks[transient.ID]
	n.mu.Unlock()
	if left != 0 {
		t.Fatalf("the transiently nacked event was delivered with %d nacks to go", left)
	}
	dead := e.dlq()
	if len(dead) != 1 || dead[0].MessageId != permanent.ID {
		t.Fatalf("dead-letter queue holds %d messages, want the permanently nacked event only", len(dead))
	}
	if reason, _ := dead[0].Headers["x-outbox-reason"].(string); !strings.Contains(reason, "nacked 5 times") {
		t.Fatalf("reason %q", reason)
	}
	if n := testutil.ToFloat64(r.metrics.Reconnects.WithLabelValues("rabbitmq")); n < 1 {
		t.Fatalf("%v sessions ended on the broker; the %d nacks in a row should have ended one", n, 2*maxNacks)
	}
	r.stop(t)
}

// TestAnEventNackedInEverySessionIsDeadLettered (invariant 8, poison does
// not stall): RabbitMQ nacks a message its queue can never take (over
// x-max-length-bytes, with reject-publish) on every node and every
// channel. After maxNackSessions sessions in a row ended on its nacks, over
// NackPoisonAfter (15 s here, longer than 10 sessions take; 5 minutes by
// default), it is dead-lettered
// with the reason, its row marked, and the stream goes on; the event
// behind it is delivered.
func TestAnEventNackedInEverySessionIsDeadLettered(t *testing.T) {
	e := newEnv(t)
	stuck := newEvent("order", "created", `{"n":1}`)
	after := newEvent("order", "paid", `{"n":2}`)
	n := &nacking{nacks: map[string]int{stuck.ID: 1 << 20}}
	const poisonAfter = 15 * time.Second
	r := e.startWith(func(x *Relay) { x.opt.NackPoisonAfter = poisonAfter },
		func(p sink.Publisher) sink.Publisher { n.Publisher = p; return n })
	t0 := time.Now()
	r.waitStreaming(t)
	e.insertTx([]event{stuck, after}, true, nil)
	waitFor(t, 90*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	if took := time.Since(t0); took < poisonAfter {
		t.Fatalf("dead-lettered after %s of nacks, before NackPoisonAfter (%s)", took.Round(time.Millisecond), poisonAfter)
	}
	dead := e.dlq()
	if len(dead) != 1 || dead[0].MessageId != stuck.ID {
		t.Fatalf("dead-letter queue holds %d messages, want the event nacked in every session", len(dead))
	}
	want := "sessions in a row, for "
	if reason, _ := dead[0].Headers["x-outbox-reason"].(string); !strings.Contains(reason, want) {
		t.Fatalf("reason %q, want it to say %q", reason, want)
	}
	if !slices.Contains(e.receivedIDs(), after.ID) {
		t.Fatalf("the event behind was not delivered: %v", e.receivedIDs())
	}
	if got := testutil.ToFloat64(r.metrics.Reconnects.WithLabelValues("rabbitmq")); got < maxNackSessions-1 {
		t.Fatalf("%v sessions ended on the broker before the dead-letter; want %d", got, maxNackSessions-1)
	}
	r.stop(t)
}

// TestHeartbeatIsAcknowledged: with RELAY_HEARTBEAT_INTERVAL the relay
// writes transactional logical messages and the slot moves past them with
// no outbox traffic at all.
func TestHeartbeatIsAcknowledged(t *testing.T) {
	e := newEnv(t)
	e.cfg.HeartbeatInterval = 100 * time.Millisecond
	spy := &heartbeatSpy{}
	r := e.startWith(func(x *Relay) { spy.store = x.db; x.db = spy }, nil)
	r.waitStreaming(t)
	waitFor(t, 10*time.Second, "a heartbeat", func() bool { return spy.lsn.Load() != 0 })
	hb := pglogrepl.LSN(spy.lsn.Load()).String()
	waitFor(t, 10*time.Second, "the slot past the heartbeat", func() bool { return e.slotPast(hb) })
	if e.receivedCount() != 0 {
		t.Fatal("a heartbeat was published as an event")
	}
	r.stop(t)
}

// heartbeatSpy remembers where the last heartbeat was written.
type heartbeatSpy struct {
	store
	lsn atomic.Uint64
}

func (h *heartbeatSpy) emitHeartbeat(ctx context.Context) (pglogrepl.LSN, error) {
	lsn, err := h.store.emitHeartbeat(ctx)
	if err == nil {
		h.lsn.Store(uint64(lsn))
	}
	return lsn, err
}

// TestReplayFilterLooksPastDeletedRows (invariant 4): a replayed batch that
// ends on a row the application deleted since says nothing of what comes
// after it; the filter goes on skipping marked rows. It used to stop at
// the deleted row, and every marked row after it was published again (the
// simulator, seed 5382: 46 duplicates after one crash).
func TestReplayFilterLooksPastDeletedRows(t *testing.T) {
	e := newEnv(t)
	s := e.testSession()
	s.filtering = true
	ctx := context.Background()
	marked, deleted, unmarked := newEvent("order", "created", `{}`), newEvent("order", "paid", `{}`), newEvent("order", "shipped", `{}`)
	e.insertTx([]event{marked, deleted}, true, nil)
	_, err := e.pool.Exec(ctx, `UPDATE outbox_events SET published_at = now() WHERE id = $1`, marked.ID)
	must(t, err)
	_, err = e.pool.Exec(ctx, `DELETE FROM outbox_events WHERE id = $1`, deleted.ID)
	must(t, err)

	batch := []*item{{ev: decoder.Event{ID: marked.ID}}, {ev: decoder.Event{ID: deleted.ID}}}
	must(t, s.filterPublished(ctx, batch))
	if batch[0].fate != fateSkip || batch[1].fate == fateSkip {
		t.Fatalf("fates %d, %d; want the marked row skipped and the deleted one published", batch[0].fate, batch[1].fate)
	}
	if !s.filtering {
		t.Fatal("the filter stopped at a deleted row: the marked rows after it would be published again")
	}

	e.insertTx([]event{unmarked}, true, nil)
	batch = []*item{{ev: decoder.Event{ID: unmarked.ID}}}
	must(t, s.filterPublished(ctx, batch))
	if batch[0].fate == fateSkip || s.filtering {
		t.Fatalf("an unmarked row: fate %d, filtering = %v; want it published and the filter off", batch[0].fate, s.filtering)
	}
}
