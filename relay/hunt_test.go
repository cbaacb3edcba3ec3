package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/pgsession"
	"github.com/outbox-relay/outbox-relay/sink"
	relaystatus "github.com/outbox-relay/outbox-relay/status"
)

// checkOnceInOrder asserts that every event arrived exactly once, in the
// order given, and that every row is marked.
func (e *env) checkOnceInOrder(want []event) {
	e.t.Helper()
	got := e.receivedIDs()
	if len(got) != len(want) {
		e.t.Fatalf("received %d messages, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i].ID {
			e.t.Fatalf("message %d is %s, want %s", i, got[i], want[i].ID)
		}
	}
	if n := e.unpublished(); n != 0 {
		e.t.Fatalf("%d rows not marked", n)
	}
}

// TestSearchPathWithoutPublic (invariant 12): a database whose search_path
// does not name the schema of the relay's own tables
// (outbox_relay_slot_state, outbox_relay_confirmed) still has its backlog
// and its new events delivered in order and marked.
func TestSearchPathWithoutPublic(t *testing.T) {
	e := newEnv(t)
	e.strictDBA(map[string]string{"search_path": "nowhere"})
	var backlog []event
	for i := 0; i < 20; i++ {
		backlog = append(backlog, newEvent("order", "created", fmt.Sprintf(`{"i":%d}`, i)))
	}
	e.insertTx(backlog, true, nil)
	r := e.start(nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case err := <-r.done:
			r.done <- err
		case <-time.After(20 * time.Second):
		}
	}()
	waitFor(t, 20*time.Second, "the relay to stream or to return", func() bool {
		select {
		case <-done:
			return true
		default:
		}
		return r.metrics.Ready() == ""
	})
	select {
	case <-done:
		err := <-r.done
		r.done <- err
		t.Fatalf("Run returned %v", err)
	default:
	}
	more := []event{newEvent("order", "paid", `{}`), newEvent("order", "shipped", `{}`)}
	e.insertTx(more, true, nil)
	e.waitReceived(len(backlog)+len(more), 20*time.Second)
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
	e.checkOnceInOrder(append(backlog, more...))

	// status, through a pool built as the binary builds it, finds the
	// records' table too.
	pc, err := pgsession.PoolConfig(e.dbURL, 1, pgsession.Bounds{Statement: 30 * time.Second})
	must(t, err)
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	must(t, err)
	defer pool.Close()
	rep, err := relaystatus.Gather(context.Background(), pool, e.cfg.Slot, e.cfg.Publication, "public", "outbox_events", "occurred_at", 0, false)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	if rep.Sync.ConfirmedUnmarked == nil || *rep.Sync.ConfirmedUnmarked != 0 {
		t.Fatalf("status counts %v confirmed, unmarked events; want 0 (outbox_relay_confirmed found)", rep.Sync.ConfirmedUnmarked)
	}
}

// TestStateTablesOffTheSearchPathAreNamed: where the relay's table is in
// several schemas and none is on the search_path, the error says so and
// names them, rather than asking to run migrate.
func TestStateTablesOffTheSearchPathAreNamed(t *testing.T) {
	r := &Relay{schema: "app"}
	visible := "public"
	for _, c := range []struct {
		visible    *string
		everywhere []string
		want       string
	}{
		{&visible, []string{"other", "public"}, "public"},
		{nil, []string{"app", "public"}, "app"},
		{nil, []string{"public"}, "public"},
	} {
		got, err := r.pickStateSchema(confirmedTable, c.visible, c.everywhere, "nowhere")
		if err != nil || got != c.want {
			t.Fatalf("pickStateSchema(%v) = %q, %v; want %q", c.everywhere, got, err, c.want)
		}
	}
	_, err := r.pickStateSchema(confirmedTable, nil, []string{"a", "b"}, "nowhere")
	if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), "schemas a, b") || !strings.Contains(err.Error(), "search_path (nowhere)") {
		t.Fatalf("ambiguous schemas: %v", err)
	}
	_, err = r.pickStateSchema(slotStateTable, nil, nil, "nowhere")
	if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), "migration 003") {
		t.Fatalf("missing table: %v", err)
	}
}

// faulty fails the Nth call of Publish, of Wait and of DeadLetter (counted
// over every session, each once), as a broker connection that breaks at
// that point does.
type faulty struct {
	publishAt, waitAt, deadAt int64
	publishes, waits, deads   atomic.Int64
}

var errFaulty = errors.New("test: broker connection failed")

func (f *faulty) wrap(p sink.Publisher) sink.Publisher { return faultyPublisher{p, f} }

type faultyPublisher struct {
	sink.Publisher
	f *faulty
}

func (p faultyPublisher) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	if p.f.publishes.Add(1) == p.f.publishAt {
		return nil, errFaulty
	}
	pe, err := p.Publisher.Publish(ctx, m)
	if err != nil {
		return nil, err
	}
	return faultyPending{pe, p.f}, nil
}

func (p faultyPublisher) DeadLetter(ctx context.Context, m *sink.Message, reason string) error {
	if p.f.deads.Add(1) == p.f.deadAt {
		return errFaulty
	}
	return p.Publisher.DeadLetter(ctx, m, reason)
}

type faultyPending struct {
	sink.Pending
	f *faulty
}

func (p faultyPending) Wait(ctx context.Context) (sink.Result, error) {
	if p.f.waits.Add(1) == p.f.waitAt {
		return sink.Result{}, errFaulty
	}
	return p.Pending.Wait(ctx)
}

// checkFirstDeliveries asserts, for events in insert order, that each was
// delivered (or, if in dead, dead-lettered and not delivered), that the
// first deliveries keep insert order per aggregate, and that every row is
// marked. It returns the number of duplicates.
func (e *env) checkFirstDeliveries(evs []event, dead map[string]bool) int {
	e.t.Helper()
	index := make(map[string]int, len(evs))
	for i, ev := range evs {
		index[ev.ID] = i
	}
	seen := map[string]bool{}
	last := map[string]int{} // aggregate -> insert index of its last first delivery
	dups := 0
	for _, id := range e.receivedIDs() {
		if seen[id] {
			dups++
			continue
		}
		seen[id] = true
		i, ok := index[id]
		if !ok {
			e.t.Fatalf("delivered %s, which no test row has", id)
		}
		if dead[id] {
			e.t.Fatalf("%s delivered although the broker can never accept it", id)
		}
		agg := evs[i].AggregateType + "/" + evs[i].AggregateID
		if prev, ok := last[agg]; ok && prev > i {
			e.t.Fatalf("aggregate %s: %s (row %d) first delivered after row %d", agg, id, i, prev)
		}
		last[agg] = i
	}
	dlq := map[string]bool{}
	for _, d := range e.dlq() {
		dlq[d.MessageId] = true
	}
	for _, ev := range evs {
		switch {
		case dead[ev.ID] && !dlq[ev.ID]:
			e.t.Fatalf("poison row %s not dead-lettered", ev.ID)
		case !dead[ev.ID] && !seen[ev.ID]:
			e.t.Fatalf("row %s never delivered (lost)", ev.ID)
		}
	}
	if n := e.unpublished(); n != 0 {
		e.t.Fatalf("%d rows not marked", n)
	}
	return dups
}

// sweepPendingState reads outbox_relay_slot_state for the test's slot.
func (e *env) sweepPendingState() bool {
	e.t.Helper()
	var pending bool
	must(e.t, e.pool.QueryRow(context.Background(),
		`SELECT sweep_pending FROM outbox_relay_slot_state WHERE slot_name = $1`, e.cfg.Slot).Scan(&pending))
	return pending
}

// mixedBacklog is rows of three aggregates in transactions of 1 to 5, with
// poison rows (a routing key over 255 bytes) and unroutable ones (no queue
// bound for aggregate_type lost) among them; it returns them in insert
// order and the ids that can only be dead-lettered.
func mixedBacklog(n int) ([]event, map[string]bool) {
	var evs []event
	dead := map[string]bool{}
	for i := 0; i < n; i++ {
		ev := newEvent("order", "changed", fmt.Sprintf(`{"i":%d}`, i))
		switch i % 37 {
		case 5:
			ev.EventType = strings.Repeat("p", 300)
			dead[ev.ID] = true
		case 20:
			ev.AggregateType = "lost"
			dead[ev.ID] = true
		}
		evs = append(evs, ev)
	}
	return evs, dead
}

func (e *env) insertInTxs(evs []event) {
	e.t.Helper()
	for i := 0; i < len(evs); {
		k := min(len(evs), i+1+i%5)
		e.insertRaw(evs[i:k])
		i = k
	}
}

// TestBrokerFailuresMidSweep (invariants 2, 3, 7, 8): the broker fails
// during the table sweep, in Publish, in Wait and in DeadLetter, each at
// a different point; each failure ends the session and the sweep is redone
// on a new slot. Every row is delivered (or, poison and unroutable ones,
// dead-lettered), first deliveries keep insert order per aggregate, every
// row is marked, and the slot ends up streaming with its sweep finished.
func TestBrokerFailuresMidSweep(t *testing.T) {
	e := newEnv(t)
	e.bindOnly("order.#")
	e.cfg.PublishWindow = 20
	e.cfg.MarkBatchSize = 10
	evs, dead := mixedBacklog(400)
	e.insertInTxs(evs)
	f := &faulty{publishAt: 90, waitAt: 200, deadAt: 3}
	r := e.start(f.wrap)
	r.waitStreaming(t)
	more, moreDead := mixedBacklog(40)
	e.insertInTxs(more)
	for id := range moreDead {
		dead[id] = true
	}
	all := append(evs, more...)
	waitFor(t, 60*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	time.Sleep(500 * time.Millisecond) // the last deliveries
	r.stop(t)
	if f.publishes.Load() < f.publishAt || f.waits.Load() < f.waitAt || f.deads.Load() < f.deadAt {
		t.Fatalf("not every failure happened: %d publishes, %d waits, %d dead letters",
			f.publishes.Load(), f.waits.Load(), f.deads.Load())
	}
	dups := e.checkFirstDeliveries(all, dead)
	t.Logf("%d duplicates", dups)
	if e.sweepPendingState() {
		t.Fatal("the slot's sweep is still pending")
	}
	// The walsender ends a moment after the relay closes its connection.
	waitFor(t, 10*time.Second, "the slot to be released after the relay stopped", func() bool {
		var active bool
		must(t, e.pool.QueryRow(context.Background(), `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, e.cfg.Slot).Scan(&active))
		return !active
	})
}

// stopWithin stops the relay as SIGTERM does and fails unless Run returns
// within limit.
func (r *running) stopWithin(t *testing.T, limit time.Duration) {
	t.Helper()
	t0 := time.Now()
	r.cancel()
	select {
	case err := <-r.done:
		r.done <- nil
		if err != nil {
			t.Fatalf("Run returned %v after stop", err)
		}
		t.Logf("Run returned %s after the stop", time.Since(t0).Round(time.Millisecond))
	case <-time.After(limit):
		t.Fatalf("Run did not return within %s of the stop", limit)
	}
}

// TestStopMidSweepWithConfirmsHeld (invariants 11, 2, 3): SIGTERM while
// the table sweep waits for confirms the broker holds back returns within
// RELAY_SHUTDOWN_TIMEOUT plus a moment; the next relay redoes the sweep
// and nothing is lost, in order.
func TestStopMidSweepWithConfirmsHeld(t *testing.T) {
	e := newEnv(t)
	e.cfg.PublishWindow = 50
	e.cfg.ShutdownTimeout = 2 * time.Second
	evs, dead := mixedBacklog(300)
	for id := range dead { // all routable here
		delete(dead, id)
	}
	for i := range evs {
		evs[i].AggregateType, evs[i].EventType = "order", "changed"
	}
	e.insertInTxs(evs)
	var g *gated
	r := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	e.waitReceived(50, 20*time.Second) // the window is full, no confirm comes
	r.stopWithin(t, e.cfg.ShutdownTimeout+3*time.Second)
	if !e.sweepPendingState() {
		t.Fatal("the interrupted sweep is not pending")
	}
	r2 := e.start(nil)
	r2.waitStreaming(t)
	waitFor(t, 30*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	time.Sleep(300 * time.Millisecond)
	r2.stop(t)
	t.Logf("%d duplicates", e.checkFirstDeliveries(evs, dead))
}

// TestStopWhileAMarkWaitsForARowLock (invariants 11, 12, 2): SIGTERM while
// the mark waits for a row lock an application holds (SELECT … FOR UPDATE)
// returns within RELAY_SHUTDOWN_TIMEOUT plus a moment and leaves no lock
// waiter behind; once the application lets go, the next relay marks the
// row.
func TestStopWhileAMarkWaitsForARowLock(t *testing.T) {
	e := newEnv(t)
	e.cfg.ShutdownTimeout = 2 * time.Second
	var g *gated
	r := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	r.waitStreaming(t)
	evs := []event{newEvent("order", "created", `{}`), newEvent("order", "paid", `{}`)}
	e.insertTx(evs, true, nil)
	e.waitReceived(2, 10*time.Second)
	ctx := context.Background()
	app, err := e.pool.Begin(ctx)
	must(t, err)
	defer func() { _ = app.Rollback(ctx) }()
	_, err = app.Exec(ctx, `SELECT 1 FROM outbox_events WHERE id = $1 FOR UPDATE`, evs[1].ID)
	must(t, err)
	close(g.open)
	waitFor(t, 10*time.Second, "the mark to wait for the row lock", func() bool {
		var n int
		must(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = 'outbox-relay' AND wait_event_type = 'Lock' AND datname = current_database()`).Scan(&n))
		return n > 0
	})
	r.stopWithin(t, e.cfg.ShutdownTimeout+3*time.Second)
	// The stop cancels the mark on the server (a cancel request); on a
	// loaded machine that may take a moment, and the relay's own
	// lock_timeout (half of RELAY_POSTGRES_TIMEOUT) ends the wait at worst.
	waitFor(t, e.cfg.PostgresTimeout, "no relay session waiting for the lock", func() bool {
		var n int
		must(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = 'outbox-relay' AND wait_event_type = 'Lock' AND datname = current_database()`).Scan(&n))
		return n == 0
	})
	must(t, app.Rollback(ctx))
	r2 := e.start(nil)
	r2.waitStreaming(t)
	waitFor(t, 20*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r2.stop(t)
	e.checkFirstDeliveries(evs, nil)
}

// TestStopDuringANackBackoff (invariant 11): SIGTERM while a nacked event
// waits for its next republish (a backoff of seconds) returns within
// RELAY_SHUTDOWN_TIMEOUT plus a moment; the next relay delivers it.
func TestStopDuringANackBackoff(t *testing.T) {
	e := newEnv(t)
	e.cfg.ShutdownTimeout = time.Second
	e.cfg.BackoffMin = 20 * time.Second
	e.cfg.BackoffMax = 20 * time.Second
	ev := newEvent("order", "created", `{}`)
	n := &nacking{nacks: map[string]int{ev.ID: 3}}
	r := e.start(func(p sink.Publisher) sink.Publisher { n.Publisher = p; return n })
	r.waitStreaming(t)
	e.insertTx([]event{ev}, true, nil)
	waitFor(t, 10*time.Second, "two nacks (the second retry waits)", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.nacks[ev.ID] <= 1
	})
	r.stopWithin(t, e.cfg.ShutdownTimeout+3*time.Second)
	e.cfg.BackoffMin, e.cfg.BackoffMax = 50*time.Millisecond, time.Second
	r2 := e.start(nil)
	r2.waitStreaming(t)
	waitFor(t, 20*time.Second, "the row marked", func() bool { return e.unpublished() == 0 })
	r2.stop(t)
	e.checkFirstDeliveries([]event{ev}, nil)
}

// TestTwinsOnAFreshSlotOwnerKilledMidSweep (invariants 10, 2, 3): two
// relays started at the same instant on a fresh slot with a backlog: one
// sweeps, the other stands by, and nothing is sent twice meanwhile. The
// owner is then killed mid-sweep (RELAY_SHUTDOWN_TIMEOUT 1ms abandons what
// is in flight); the standby takes over, sweeps again, and streams: no row
// lost, first deliveries in insert order per aggregate, every row marked,
// one slot.
func TestTwinsOnAFreshSlotOwnerKilledMidSweep(t *testing.T) {
	e := newEnv(t)
	e.cfg.ShutdownTimeout = time.Millisecond
	e.cfg.PublishWindow = 50
	e.cfg.MarkBatchSize = 20
	evs, dead := mixedBacklog(600)
	for id := range dead {
		delete(dead, id)
	}
	for i := range evs {
		evs[i].AggregateType, evs[i].EventType = "order", "changed"
	}
	e.insertInTxs(evs)
	slow := func(p sink.Publisher) sink.Publisher { return slowed{p, 3 * time.Millisecond} }
	var twins [2]*running
	for i := range twins {
		twins[i] = e.start(slow) // start returns at once; Run begins in a goroutine
	}
	waitFor(t, 20*time.Second, "one relay to stand by", func() bool {
		return strings.HasPrefix(twins[0].metrics.Ready(), "standby") || strings.HasPrefix(twins[1].metrics.Ready(), "standby")
	})
	owner, standby := twins[0], twins[1]
	if strings.HasPrefix(owner.metrics.Ready(), "standby") {
		owner, standby = standby, owner
	}
	waitFor(t, 20*time.Second, "the sweep to be under way", func() bool { return e.receivedCount() >= 150 })
	e.mu.Lock()
	for id, n := range e.ids {
		if n != 1 {
			e.mu.Unlock()
			t.Fatalf("%s received %d times while one relay owned the slot", id, n)
		}
	}
	e.mu.Unlock()
	if e.receivedCount() >= len(evs) {
		t.Fatal("the sweep was over before the kill: the test proves nothing")
	}
	owner.stopWithin(t, 5*time.Second)
	standby.waitStreaming(t)
	after := []event{newEvent("order", "changed", `{"after":1}`), newEvent("order", "changed", `{"after":2}`)}
	e.insertTx(after, true, nil)
	all := append(evs, after...)
	waitFor(t, 60*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	time.Sleep(300 * time.Millisecond)
	standby.stop(t)
	t.Logf("%d duplicates", e.checkFirstDeliveries(all, dead))
	var slots int
	must(t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, e.cfg.Slot).Scan(&slots))
	if slots != 1 || e.sweepPendingState() {
		t.Fatalf("%d slots, sweep pending %v; want one slot, swept", slots, e.sweepPendingState())
	}
}

// TestStandbyStartedDuringTheOwnersDrain (invariants 10, 4): a standby
// started while the owner drains after SIGTERM (confirms held) waits for
// the drain, then streams from the owner's acknowledgement: nothing is
// sent twice after a clean drain, nothing is lost.
func TestStandbyStartedDuringTheOwnersDrain(t *testing.T) {
	e := newEnv(t)
	var g *gated
	owner := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	owner.waitStreaming(t)
	evs := []event{newEvent("order", "created", `{}`), newEvent("order", "paid", `{}`), newEvent("order", "shipped", `{}`)}
	e.insertTx(evs, true, nil)
	e.waitReceived(3, 10*time.Second)
	owner.cancel() // SIGTERM: the owner drains, its confirms held
	standby := e.start(nil)
	waitFor(t, 10*time.Second, "the second relay to stand by", func() bool {
		return strings.HasPrefix(standby.metrics.Ready(), "standby")
	})
	time.Sleep(500 * time.Millisecond) // a few standby retries during the drain
	if e.receivedCount() != 3 {
		t.Fatalf("%d messages during the owner's drain, want 3", e.receivedCount())
	}
	close(g.open)
	owner.stop(t)
	standby.waitStreaming(t)
	more := []event{newEvent("order", "closed", `{}`)}
	e.insertTx(more, true, nil)
	e.waitReceived(4, 20*time.Second)
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	time.Sleep(300 * time.Millisecond)
	standby.stop(t)
	e.checkOnceInOrder(append(evs, more...))
}

// TestMarkBehindAnApplicationsRowLock (invariants 12, 4, 1): an
// application holds a row lock on an outbox row (SELECT … FOR UPDATE)
// longer than the relay's lock_timeout. The mark fails and names the lock,
// the session restarts, the confirmed events are carried rather than
// published again, and once the lock is gone every row is marked and the
// slot acknowledged past them: each event delivered once.
func TestMarkBehindAnApplicationsRowLock(t *testing.T) {
	e := newEnv(t)
	e.cfg.PostgresTimeout = 2 * time.Second // lock_timeout 1s
	r := e.start(nil)
	r.waitStreaming(t)
	ctx := context.Background()
	locked := newEvent("order", "created", `{"locked":true}`)
	// The row is committed, then locked by the application before the
	// relay's mark gets there (checked below).
	app, err := e.pool.Begin(ctx)
	must(t, err)
	defer func() { _ = app.Rollback(ctx) }()
	e.insertTx([]event{locked}, true, nil)
	// Lock it at once; if the relay marked it first, the test proves nothing.
	var published *time.Time
	must(t, app.QueryRow(ctx, `SELECT published_at FROM outbox_events WHERE id = $1 FOR UPDATE`, locked.ID).Scan(&published))
	if published != nil {
		t.Skip("the relay marked the row before the application locked it")
	}
	evs := []event{locked}
	for i := 0; i < 5; i++ {
		ev := newEvent("order", "changed", fmt.Sprintf(`{"i":%d}`, i))
		evs = append(evs, ev)
		e.insertTx([]event{ev}, true, nil)
	}
	end := e.currentLSN()
	waitFor(t, 20*time.Second, "a mark to fail on lock_timeout", func() bool {
		return r.metrics.Ready() != "" && strings.Contains(r.metrics.Ready(), "lock_timeout")
	})
	time.Sleep(2 * time.Second) // a few sessions fail the same way
	if e.slotPast(end) {
		t.Fatal("slot acknowledged past rows that are not marked")
	}
	must(t, app.Rollback(ctx))
	waitFor(t, 30*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	waitFor(t, 10*time.Second, "the slot acknowledged", func() bool { return e.slotPast(end) })
	r.stop(t)
	e.checkOnceInOrder(evs)
}

// TestTextFieldsTheSameInTheSweepAsInTheStream (invariants 3, 8 on the
// sweep): event_type and aggregate_type of every length (0 to 200,000
// bytes) and multibyte, and odd characters, come out of the table sweep
// exactly as out of the stream: the same rows delivered with the same
// values, the same rows dead-lettered for the same reason, all marked.
func TestTextFieldsTheSameInTheSweepAsInTheStream(t *testing.T) {
	e := newEnv(t)
	swept := textFieldEvents()
	e.insertRaw(swept)
	r := e.start(nil)
	r.waitStreaming(t)
	streamed := textFieldEvents()
	e.insertRaw(streamed)
	last := newEvent("order", "created", `{"last":true}`)
	e.insertTx([]event{last}, true, nil)
	waitFor(t, 60*time.Second, "the event after the rows", func() bool {
		ids := e.receivedIDs()
		return len(ids) > 0 && ids[len(ids)-1] == last.ID
	})
	waitFor(t, 10*time.Second, "rows marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
	outcome := map[string]string{}
	for _, d := range e.deliveries() {
		if outcome[d.MessageId] != "" {
			t.Fatalf("%s delivered twice", d.MessageId)
		}
		agg, _ := d.Headers["aggregate_type"].(string)
		outcome[d.MessageId] = fmt.Sprintf("delivered type=%q aggregate_type=%q key=%q body=%s", d.Type, agg, d.RoutingKey, d.Body)
	}
	for _, d := range e.dlq() {
		if outcome[d.MessageId] != "" {
			t.Fatalf("%s both delivered and dead-lettered", d.MessageId)
		}
		reason, _ := d.Headers["x-outbox-reason"].(string)
		outcome[d.MessageId] = "dead-lettered: " + reason
	}
	for i := range swept {
		a, b := outcome[swept[i].ID], outcome[streamed[i].ID]
		if a == "" || a != b {
			t.Fatalf("row %d (event_type %d bytes, aggregate_type %d bytes): swept %.200s, streamed %.200s",
				i, len(swept[i].EventType), len(swept[i].AggregateType), a, b)
		}
	}
	var order []string
	for _, id := range e.receivedIDs() {
		for _, ev := range swept {
			if ev.ID == id {
				order = append(order, id)
			}
		}
	}
	var want []string
	for _, ev := range swept {
		if strings.HasPrefix(outcome[ev.ID], "delivered") {
			want = append(want, ev.ID)
		}
	}
	if strings.Join(order, ",") != strings.Join(want, ",") {
		t.Fatalf("swept rows delivered in the order %v, want %v", order, want)
	}
}

// TestLargeTextFieldsBehindHeldConfirmsBoundedHeap (invariant 9): the
// bound in bytes holds for every field of an event, not only its payload.
// With a routing key that leaves aggregate_type out, an aggregate_type of
// 100 kB is a valid message (a header under frame_max); 1,000 of them
// behind held confirms must not fill RELAY_PUBLISH_WINDOW (100 MB) when
// RELAY_MAX_INFLIGHT_BYTES is 8 MiB.
func TestLargeTextFieldsBehindHeldConfirmsBoundedHeap(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	e.cfg.MaxInflightBytes = 8 << 20
	e.cfg.RoutingKey = "{event_type}"
	var g *gated
	r := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	r.waitStreaming(t)

	const n = 1000
	base := liveHeap()
	var ids []string
	for i := 0; i < n; i++ {
		ids = append(ids, newEvent("big", "loaded", "").ID)
	}
	for i := 0; i < n; i += 50 { // transactions the walsender need not spill
		_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
			SELECT id::uuid, repeat('a', 100000), gen_random_uuid(), 'loaded', '{}'
			FROM unnest($1::text[]) AS id`, ids[i:i+50])
		must(t, err)
	}
	// The reader has read what it may once nothing more is published.
	e.waitPublishingStops(e.receivedCount, 10, false)
	live := liveHeap()
	live -= min(base, live)
	t.Logf("live heap with confirms held: %d MiB above the start (in-flight bound %d MiB, %d events with 100 kB aggregate_type, %d published)",
		live>>20, e.cfg.MaxInflightBytes>>20, n, e.receivedCount())
	if live > 40<<20 {
		t.Fatalf("live heap %d MiB above the start with confirms held: text fields in flight not bounded by RELAY_MAX_INFLIGHT_BYTES (%d MiB)",
			live>>20, e.cfg.MaxInflightBytes>>20)
	}
	close(g.open)
	e.checkReceivedInOrder(ids)
	r.stop(t)
}

// TestSweepOfLargePayloadsBehindHeldConfirmsBoundedHeap (invariant 9 on
// the table sweep): a backlog of 1 MB payloads written before the slot
// existed is swept in memory bounded by RELAY_MAX_INFLIGHT_BYTES and the
// sweep's page bytes while the broker confirms nothing, not a page of
// 1,000 rows read whole; once the confirms come, everything is delivered
// in order, once.
func TestSweepOfLargePayloadsBehindHeldConfirmsBoundedHeap(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	e.cfg.MaxInflightBytes = 8 << 20
	const n = 200
	var ids []string
	for i := 0; i < n; i++ {
		ids = append(ids, newEvent("big", "loaded", "").ID)
	}
	for i := 0; i < n; i += 50 {
		_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
			SELECT id::uuid, 'big', gen_random_uuid(), 'loaded', jsonb_build_object('pad', repeat('x', 1000000))
			FROM unnest($1::text[]) AS id`, ids[i:i+50])
		must(t, err)
	}
	base := liveHeap()
	var g *gated
	r := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	e.waitPublishingStops(e.receivedCount, 10, true)
	live := liveHeap()
	live -= min(base, live)
	t.Logf("live heap while the sweep waits for confirms: %d MiB above the start (in-flight bound %d MiB, %d rows of 1 MB, %d published)",
		live>>20, e.cfg.MaxInflightBytes>>20, n, e.receivedCount())
	if live > 40<<20 {
		t.Fatalf("live heap %d MiB above the start while the sweep waits for confirms: not bounded by RELAY_MAX_INFLIGHT_BYTES (%d MiB) and the sweep's page",
			live>>20, e.cfg.MaxInflightBytes>>20)
	}
	close(g.open)
	e.checkReceivedInOrder(ids)
	r.stop(t)
}

// TestUnroutablePoliciesInTheSweep (invariant 8 on the sweep): unroutable
// rows in the table sweep follow RELAY_UNROUTABLE as in the stream: drop
// marks them undelivered; retry holds them until a queue is bound, then
// delivers them, loses nothing and marks every row.
func TestUnroutablePoliciesInTheSweep(t *testing.T) {
	for _, policy := range []string{"drop", "retry"} {
		t.Run(policy, func(t *testing.T) {
			e := newEnv(t)
			e.cfg.Unroutable = policy
			e.cfg.BackoffMax = 200 * time.Millisecond
			ch := e.bindOnly("order.#")
			var evs []event
			lost := map[string]bool{}
			for i := 0; i < 30; i++ {
				ev := newEvent("order", "changed", fmt.Sprintf(`{"i":%d}`, i))
				if i%7 == 3 {
					ev.AggregateType = "invoice"
					lost[ev.ID] = true
				}
				evs = append(evs, ev)
			}
			e.insertInTxs(evs)
			r := e.start(nil)
			if policy == "retry" {
				waitFor(t, 20*time.Second, "the routable rows before the held one", func() bool { return e.receivedCount() >= 3 })
				time.Sleep(time.Second) // retries meanwhile
				if e.unpublished() == 0 {
					t.Fatal("every row marked while an unroutable one was held")
				}
				must(t, ch.QueueBind(e.queue, "invoice.#", e.cfg.Exchange, false, nil))
				lost = nil
			}
			r.waitStreaming(t)
			waitFor(t, 30*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
			time.Sleep(300 * time.Millisecond)
			r.stop(t)
			seen := map[string]int{}
			for _, id := range e.receivedIDs() {
				seen[id]++
			}
			for _, ev := range evs {
				switch {
				case lost[ev.ID] && seen[ev.ID] != 0:
					t.Fatalf("dropped row %s delivered", ev.ID)
				case !lost[ev.ID] && seen[ev.ID] != 1:
					t.Fatalf("row %s delivered %d times, want once", ev.ID, seen[ev.ID])
				}
			}
			if len(e.dlq()) != 0 {
				t.Fatal("an unroutable row was dead-lettered under RELAY_UNROUTABLE=" + policy)
			}
		})
	}
}

// TestSerializableApplicationUpdatingOutboxRows (invariant 12): on a
// database whose default is serializable with a short lock_timeout, an
// application keeps updating and locking outbox rows (in serializable
// transactions of its own, retried on serialization failures) while the
// relay streams and marks them: every event is delivered once, in order,
// and every row is marked.
func TestSerializableApplicationUpdatingOutboxRows(t *testing.T) {
	e := newEnv(t)
	e.strictDBA(map[string]string{"default_transaction_isolation": "serializable", "lock_timeout": "50ms"})
	ctx := context.Background()
	app, err := pgxpool.New(ctx, e.dbURL) // the database's defaults: serializable
	must(t, err)
	defer app.Close()
	r := e.start(nil)
	r.waitStreaming(t)
	var evs []event
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var updates, failures atomic.Int64
	ids := make(chan string, 1000)
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				var id string
				select {
				case <-stop:
					return
				case id = <-ids:
				}
				err := pgx.BeginFunc(ctx, app, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, `SELECT 1 FROM outbox_events WHERE id = $1 FOR UPDATE`, id); err != nil {
						return err
					}
					time.Sleep(5 * time.Millisecond)
					_, err := tx.Exec(ctx, `UPDATE outbox_events SET payload = payload || '{"touched": true}' WHERE id = $1`, id)
					return err
				})
				if err != nil {
					failures.Add(1)
				} else {
					updates.Add(1)
				}
			}
		}()
	}
	for i := 0; i < 300; i++ {
		ev := newEvent("order", "changed", fmt.Sprintf(`{"i": %d}`, i))
		evs = append(evs, ev)
		e.insertTx([]event{ev}, true, nil)
		select {
		case ids <- ev.ID:
		default:
		}
	}
	waitFor(t, 60*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	close(stop)
	wg.Wait()
	time.Sleep(300 * time.Millisecond)
	r.stop(t)
	t.Logf("application: %d updates, %d failed (serialization or lock_timeout)", updates.Load(), failures.Load())
	e.checkOnceInOrder(evs)
	for _, d := range e.deliveries() {
		if strings.Contains(string(d.Body), "touched") {
			t.Fatalf("%s carries the application's later update, not the inserted payload", d.MessageId)
		}
	}
}

// TestSweepUnderASmallWorkMemAndTempFileLimit (invariants 7, 12): a
// database whose work_mem and temp_file_limit are 64kB still has its
// backlog swept, in insert order, and marked: PostgreSQL holds each FETCH's
// rows in work_mem and spills the rest, and a spill over temp_file_limit
// failed every page, redoing the sweep on a new slot forever.
func TestSweepUnderASmallWorkMemAndTempFileLimit(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	ctx := context.Background()
	const n = 20000
	_, err := e.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT ('00000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, 'bulk',
			('10000000-0000-4000-8000-' || lpad((i % 5)::text, 12, '0'))::uuid, 'loaded', jsonb_build_object('i', i)
		FROM generate_series(1, $1::int) AS i`, n)
	must(t, err)
	var db string
	must(t, e.pool.QueryRow(ctx, `SELECT current_database()`).Scan(&db))
	for _, s := range []string{"work_mem = '64kB'", "temp_file_limit = '64kB'"} {
		_, err := e.pool.Exec(ctx, `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` SET `+s)
		must(t, err)
	}
	t.Cleanup(func() {
		if _, err := e.pool.Exec(context.Background(), `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` RESET ALL`); err != nil {
			t.Errorf("reset the database's settings: %v", err)
		}
	})
	r := e.start(nil)
	r.waitStreaming(t)
	waitFor(t, 60*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	e.waitReceived(n, 20*time.Second)
	r.stop(t)
	got := e.receivedIDs()
	if len(got) != n {
		t.Fatalf("received %d messages, want %d", len(got), n)
	}
	for i := 0; i < n; i++ {
		if want := fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1); got[i] != want {
			t.Fatalf("message %d is %s, want %s", i, got[i], want)
		}
	}
}

// TestAnyUUIDVersionAndEqualOccurredAtOnBothPaths (invariant 3): ids of
// every UUID version (nil, max, v1, v4, v6, v7, decreasing) and one
// occurred_at shared by every transaction decide nothing: the sweep and the
// stream deliver in insert and commit order, once, and mark every row.
func TestAnyUUIDVersionAndEqualOccurredAtOnBothPaths(t *testing.T) {
	e := newEnv(t)
	ids := []string{
		"ffffffff-ffff-ffff-ffff-ffffffffffff",
		"00000000-0000-0000-0000-000000000000",
		"c232ab00-9414-11ec-b3c8-9f6bdeced846", // v1
		"1ec9414c-232a-6b00-b3c8-9f6bdeced846", // v6
		"017f22e2-79b0-7cc3-98c4-dc0c0c07398f", // v7
		"017f22e2-79b0-7cc3-98c4-dc0c0c07398e", // v7, one less
		"9f6bdece-d846-4b3c-8c8e-000000000009", // v4
		"00000000-0000-0000-0000-000000000001",
	}
	aggs := []string{"40000000-0000-4000-8000-000000000001", "40000000-0000-4000-8000-000000000002"}
	const at = "'2030-01-01 00:00:00+00'"
	rows := func(prefix string) ([][]sweepRow, []string) {
		var txs [][]sweepRow
		var want []string
		for i, id := range ids {
			id = prefix + id[len(prefix):]
			want = append(want, id)
			r := sweepRow{id: "'" + id + "'", agg: aggs[i%2], occurredAt: at}
			if i%3 == 2 && len(txs) > 0 { // some transactions of two
				txs[len(txs)-1] = append(txs[len(txs)-1], r)
				continue
			}
			txs = append(txs, []sweepRow{r})
		}
		return txs, want
	}
	sweptTxs, swept := rows("")
	e.insertRows(sweptTxs)
	r := e.start(nil)
	r.waitStreaming(t)
	streamedTxs, streamed := rows("a")
	e.insertRows(streamedTxs)
	want := append(swept, streamed...)
	e.waitReceived(len(want), 20*time.Second)
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	time.Sleep(300 * time.Millisecond)
	r.stop(t)
	if got := e.receivedIDs(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("received\n%v\nwant\n%v", got, want)
	}
}
