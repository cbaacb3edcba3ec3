package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/sink"
	relaystatus "github.com/outbox-relay/outbox-relay/status"
)

// commitLimit is how long one COMMIT may take before the load calls it
// hung. Before the relay handled being a synchronous standby, the first
// commit of outbox rows waited for the relay forever.
const commitLimit = 10 * time.Second

// load is one run of producers: outbox transactions in the relay's
// database, and single-row commits in another database of the cluster.
type load struct {
	outbox, other []time.Duration     // commit latencies
	inserted      map[string][]string // aggregate_id -> event ids in commit order
	events        int
	failure       string // the first hung or failed commit
}

// loadOpts shapes a load: producers share txPerSec; after, if set, runs
// after each outbox commit with the committed event ids.
type loadOpts struct {
	txPerSec, producers int
	after               func(ids []string) error
}

// defaultLoad is 100 transactions/s from 4 producers.
var defaultLoad = loadOpts{txPerSec: 100, producers: 4}

// runLoad commits outbox rows from producers for d: each producer owns two
// aggregates and commits transactions of 1 to 4 events at its share of the
// rate; another database gets a single-row commit every 20 ms. It stops
// early on the first commit that fails or takes longer than commitLimit.
func runLoad(t *testing.T, outboxDB, otherDB *pgxpool.Pool, phase string, d time.Duration, opt loadOpts) *load {
	t.Helper()
	ld := &load{inserted: map[string][]string{}}
	var mu sync.Mutex
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	fail := func(msg string) {
		mu.Lock()
		if ld.failure == "" {
			ld.failure = msg
		}
		mu.Unlock()
		cancel()
	}
	every := time.Duration(opt.producers) * time.Second / time.Duration(opt.txPerSec)
	h := fnv.New32a()
	h.Write([]byte(phase))
	tag := h.Sum32() & 0xffffff // the phase, in the event ids
	var wg sync.WaitGroup
	for p := range opt.producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(p), uint64(phase[0])))
			tick := time.NewTicker(every)
			defer tick.Stop()
			for n := 0; ; n++ {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				agg := fmt.Sprintf("20000000-0000-4000-8000-%012d", p*2+n%2)
				var evs []outbox.Event
				var ids []string
				for i := range 1 + rng.IntN(4) {
					evs = append(evs, outbox.Event{
						ID:            fmt.Sprintf("%08x-0000-4000-8000-%04x%08x", tag<<8|uint32(p), i, n),
						AggregateType: "order", AggregateID: agg, EventType: "changed",
						Payload: json.RawMessage(fmt.Sprintf(`{"producer":%d,"n":%d,"i":%d}`, p, n, i)),
					})
					ids = append(ids, evs[len(evs)-1].ID)
				}
				took, err := commitWith(outboxDB, func(tx pgx.Tx) error { return outbox.Insert(context.Background(), tx, evs...) })
				if err != nil {
					fail(fmt.Sprintf("%s: producer %d: outbox commit after %s: %v", phase, p, took.Round(time.Millisecond), err))
					return
				}
				if opt.after != nil {
					if err := opt.after(ids); err != nil {
						fail(fmt.Sprintf("%s: producer %d: %v", phase, p, err))
						return
					}
				}
				mu.Lock()
				ld.outbox = append(ld.outbox, took)
				ld.inserted[agg] = append(ld.inserted[agg], ids...)
				ld.events += len(evs)
				mu.Unlock()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			took, err := commitWith(otherDB, func(tx pgx.Tx) error {
				_, err := tx.Exec(context.Background(), `INSERT INTO other_writes (v) VALUES ('x')`)
				return err
			})
			if err != nil {
				fail(fmt.Sprintf("%s: commit in another database after %s: %v", phase, took.Round(time.Millisecond), err))
				return
			}
			mu.Lock()
			ld.other = append(ld.other, took)
			mu.Unlock()
		}
	}()
	wg.Wait()
	return ld
}

// commitWith runs fn in a transaction and returns how long its COMMIT took;
// a COMMIT longer than commitLimit is an error.
func commitWith(pool *pgxpool.Pool, fn func(pgx.Tx) error) (time.Duration, error) {
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit a no-op
	if err := fn(tx); err != nil {
		return 0, err
	}
	cctx, cancel := context.WithTimeout(ctx, commitLimit)
	defer cancel()
	t0 := time.Now()
	err = tx.Commit(cctx)
	took := time.Since(t0)
	if took >= commitLimit {
		return took, fmt.Errorf("COMMIT hung for %s (limit %s): it waits for a synchronous standby that never "+
			"confirms, the relay (invariant 12: no commit waits on the relay) (commit error: %v)", took.Round(time.Second), commitLimit, err)
	}
	return took, err
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p * float64(len(s)-1))
	return s[i]
}

func describe(ds []time.Duration) string {
	return fmt.Sprintf("n=%d median=%s p99=%s max=%s", len(ds),
		percentile(ds, 0.5).Round(10*time.Microsecond), percentile(ds, 0.99).Round(10*time.Microsecond),
		percentile(ds, 1).Round(10*time.Microsecond))
}

// TestSyncStandbyStarCommitsDoNotWaitOnRelay is the issue "never harm the
// database it reads", case 1: with synchronous_standby_names = '*' the
// relay's walsender, connected before the physical standby, becomes the
// synchronous standby. Commits must not hang: the relay records the
// broker's confirmation of rows it cannot mark yet, acknowledges, and marks
// them once visible; it answers keepalives at once, so commits in other
// databases do not wait for its status interval either. Nothing is lost,
// every row is marked, per-aggregate order holds, and commit p99 stays
// within 100 ms of a run without the relay's walsender.
func TestSyncStandbyStarCommitsDoNotWaitOnRelay(t *testing.T) {
	testenv.Integration(t)
	c, e, otherDB := syncWorld(t)
	e.keep = false
	// The default interval: without prompt replies, commits elsewhere in
	// the cluster would wait up to this for the relay's flush report.
	e.cfg.StatusInterval = time.Second
	e.cfg.MarkDelay = 20 * time.Millisecond

	ctx := context.Background()

	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = '*'`, `SELECT pg_reload_conf()`)
	waitFor(t, 15*time.Second, "standby1 to become the synchronous standby", func() bool {
		return c.syncStates()["standby1"] == "sync"
	})

	start := func() *running {
		return e.startWith(func(r *Relay) { r.opt.SyncCheckInterval = time.Second }, nil)
	}
	// relayAsSync gives the relay the lower walsender slot: stop the
	// standby, start the relay, start the standby again; and proves it.
	relayAsSync := func() *running {
		c.run("standby-stop")
		rr := start()
		rr.waitStreaming(t)
		c.run("standby-start")
		var states map[string]string
		deadline := time.Now().Add(15 * time.Second)
		for {
			states = c.syncStates()
			if states["outbox-relay-test"] == "sync" && states["standby1"] == "potential" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("setup: the relay's walsender is not the synchronous standby: pg_stat_replication says %v", states)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("pg_stat_replication: %v", states)
		return rr
	}
	var loads []*load
	syncPhase := func(phase string) *load {
		rr := relayAsSync()
		ld := runLoad(t, e.pool, otherDB, phase, 20*time.Second, defaultLoad)
		if ld.failure != "" {
			t.Fatalf("with the relay as synchronous standby: %s", ld.failure)
		}
		loads = append(loads, ld)
		t.Logf("%s: relay as synchronous standby: outbox commits %s; other database %s; %d events",
			phase, describe(ld.outbox), describe(ld.other), ld.events)
		if s := c.syncStates(); s["outbox-relay-test"] != "sync" {
			t.Fatalf("the relay stopped being the synchronous standby during the run: %v", s)
		}
		waitFor(t, 10*time.Second, "the relay's metric and /readyz to say it is the synchronous standby", func() bool {
			return value(rr.metrics.SyncStandby.WithLabelValues("sync", "false")) == 1 &&
				strings.Contains(rr.metrics.Notice(), "synchronous standby candidate (sync_state sync")
		})
		// /readyz: ready (streaming), with the explanation.
		rec := httptest.NewRecorder()
		rr.metrics.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
		if body := rec.Body.String(); rec.Code != http.StatusOK || !strings.HasPrefix(body, "streaming\n") ||
			!strings.Contains(body, "synchronous standby candidate (sync_state sync") || !strings.Contains(body, "FIRST 1 (standby1)") {
			t.Errorf("/readyz = %d %q, want streaming and why commits may wait for the relay, with the fix", rec.Code, body)
		}
		// outbox-relay status says it too, in text and JSON.
		rep, err := relaystatus.Gather(ctx, e.pool, e.cfg.Slot, e.cfg.Publication, "public", "outbox_events", "occurred_at", 0, false)
		must(t, err)
		var text, js bytes.Buffer
		must(t, rep.WriteText(&text))
		must(t, rep.WriteJSON(&js))
		if rep.Sync.State == nil || *rep.Sync.State != "sync" || !strings.Contains(strings.Join(rep.Problems, "\n"), "synchronous standby candidate") ||
			!regexp.MustCompile(`synchronous standby\s+sync \(synchronous_standby_names = "\*"\)`).Match(text.Bytes()) ||
			!strings.Contains(js.String(), `"sync_state": "sync"`) {
			t.Errorf("outbox-relay status does not say the relay is the synchronous standby:\n%s\n%s", text.String(), js.String())
		}
		if n := value(rr.metrics.EventsRecorded); n == 0 {
			t.Fatal("no event went through outbox_relay_confirmed: the run did not exercise the durable record")
		}
		total := 0
		for _, ld := range loads {
			total += ld.events
		}
		waitAllMarked(t, e, total)
		rr.stop(t)
		return ld
	}
	syncRun := syncPhase("sync")

	// Baseline: the same load with no relay walsender (the slot is kept);
	// standby1 is the synchronous standby.
	waitFor(t, 15*time.Second, "standby1 to be the synchronous standby again", func() bool {
		return c.syncStates()["standby1"] == "sync"
	})
	base := runLoad(t, e.pool, otherDB, "base", 10*time.Second, defaultLoad)
	if base.failure != "" {
		t.Fatalf("baseline: %s", base.failure)
	}
	loads = append(loads, base)
	t.Logf("baseline (standby1 synchronous, no relay): outbox commits %s; other database %s",
		describe(base.outbox), describe(base.other))

	// The acceptance bound: commit p99 within 100 ms of the
	// baseline. Other engineers' tests share this machine's 2 cores, and a
	// burst of theirs can cost one run that much; a real regression (a
	// wait for the 1s status interval, or a hang) fails every run, so an
	// over-the-bound run is measured once more.
	over := func(ld *load) []string {
		var msgs []string
		for _, cmp := range []struct {
			what      string
			sync, bas []time.Duration
		}{{"outbox commits", ld.outbox, base.outbox}, {"commits in another database", ld.other, base.other}} {
			ps, pb := percentile(cmp.sync, 0.99), percentile(cmp.bas, 0.99)
			t.Logf("%s: p99 %s with the relay as synchronous standby, %s baseline (difference %s, ratio %.1f)",
				cmp.what, ps.Round(10*time.Microsecond), pb.Round(10*time.Microsecond), (ps - pb).Round(10*time.Microsecond),
				float64(ps)/float64(max(pb, time.Microsecond)))
			if ps-pb > 100*time.Millisecond {
				msgs = append(msgs, fmt.Sprintf("%s: p99 %s is more than 100ms above the baseline's %s", cmp.what, ps, pb))
			}
		}
		return msgs
	}
	if msgs := over(syncRun); len(msgs) > 0 {
		t.Logf("over the bound (%s); measuring the synchronous run once more", strings.Join(msgs, "; "))
		for _, m := range over(syncPhase("retry")) {
			t.Error(m)
		}
	}

	// The baseline's events come through the slot when a relay runs again.
	start().waitStreaming(t)
	total := 0
	for _, ld := range loads {
		total += ld.events
	}
	waitAllMarked(t, e, total)

	// Nothing lost, nothing twice, per-aggregate order.
	e.mu.Lock()
	order := slices.Clone(e.order)
	counts := make(map[string]int, len(e.ids))
	for id, n := range e.ids {
		counts[id] = n
	}
	e.mu.Unlock()
	pos := make(map[string]int, len(order))
	for i, id := range order {
		if _, ok := pos[id]; !ok {
			pos[id] = i
		}
	}
	for _, ld := range loads {
		for agg, ids := range ld.inserted {
			for i, id := range ids {
				switch {
				case counts[id] == 0:
					t.Fatalf("event %s (aggregate %s) was never delivered", id, agg)
				case counts[id] > 1:
					t.Errorf("event %s was delivered %d times without any crash", id, counts[id])
				case i > 0 && pos[id] < pos[ids[i-1]]:
					t.Fatalf("aggregate %s: event %s arrived before %s, which was committed first", agg, id, ids[i-1])
				}
			}
		}
	}
}

// waitAllMarked waits until n distinct events arrived, no row is
// unpublished and no confirmation record is left.
func waitAllMarked(t *testing.T, e *env, n int) {
	t.Helper()
	waitFor(t, 60*time.Second, fmt.Sprintf("%d distinct events delivered", n), func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return len(e.ids) >= n
	})
	waitFor(t, 60*time.Second, "every row marked published and no record left in outbox_relay_confirmed", func() bool {
		var records int
		must(t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_relay_confirmed`).Scan(&records))
		return e.unpublished() == 0 && records == 0
	})
}

// value reads a gauge or counter.
func value(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	if g := m.GetGauge(); g != nil {
		return g.GetValue()
	}
	return m.GetCounter().GetValue()
}

// TestReplaySkipsRecordedRows (invariants 1 and 4, the synchronous standby
// exception): a previous relay recorded the broker's confirmation of rows it
// could not mark yet (outbox_relay_confirmed), then crashed: before its
// acknowledgement (the transaction is replayed) or after it (the stream
// never delivers the row again). The next session publishes none of the
// recorded events again, publishes the rest of the transaction, marks
// everything and deletes the records. In both RELAY_ON_PUBLISHED modes:
// with delete, completing a record deletes its row.
func TestReplaySkipsRecordedRows(t *testing.T) {
	for _, mode := range []string{config.OnPublishedMark, config.OnPublishedDelete} {
		t.Run(mode, func(t *testing.T) { replaySkipsRecordedRows(t, mode) })
	}
}

func replaySkipsRecordedRows(t *testing.T, mode string) {
	e := newEnv(t)
	e.cfg.OnPublished = mode
	ctx := context.Background()
	// The slot exists, as the previous relay left it.
	_, err := e.pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, e.cfg.Slot)
	must(t, err)

	// Recorded before the crash: the first 10 of a 20-event transaction;
	// the crash came before the record of the other 10.
	var recorded, rest []event
	for range 10 {
		recorded = append(recorded, newEvent("order", "created", `{}`))
	}
	for range 10 {
		rest = append(rest, newEvent("order", "paid", `{}`))
	}
	e.insertTx(append(append([]event(nil), recorded...), rest...), true, nil)
	// Acknowledged before the crash but not marked: the slot will not
	// deliver this row again (it is streamed as inserted published, and
	// the relay's publication does not stream the UPDATE).
	gone := newEvent("order", "acked", `{}`)
	_, err = e.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, published_at)
		VALUES ($1, $2, $3, $4, $5, now())`, gone.ID, gone.AggregateType, gone.AggregateID, gone.EventType, gone.Payload)
	must(t, err)
	_, err = e.pool.Exec(ctx, `UPDATE outbox_events SET published_at = NULL WHERE id = $1`, gone.ID)
	must(t, err)
	ids := []string{gone.ID}
	for _, ev := range recorded {
		ids = append(ids, ev.ID)
	}
	_, err = e.pool.Exec(ctx, `INSERT INTO outbox_relay_confirmed (slot_name, id, xid)
		SELECT $1, id, xmin::text::xid8 FROM outbox_events WHERE id = ANY($2::uuid[])`, e.cfg.Slot, ids)
	must(t, err)
	if mode == config.OnPublishedDelete {
		// The previous relay moved deleted_through with its records.
		_, err = e.pool.Exec(ctx, `INSERT INTO outbox_relay_slot_state (slot_name, sweep_pending, deleted_through)
			VALUES ($1, false, pg_current_wal_lsn())`, e.cfg.Slot)
		must(t, err)
	}
	end := e.currentLSN()

	r := e.start(nil)
	e.waitReceived(len(rest), 20*time.Second)
	waitFor(t, 20*time.Second, "the slot past the replayed transaction", func() bool { return e.slotPast(end) })
	time.Sleep(300 * time.Millisecond)
	got := e.receivedIDs()
	if len(got) != len(rest) {
		t.Fatalf("received %d messages, want only the %d events that were not recorded: %v", len(got), len(rest), got)
	}
	for i, w := range rest {
		if got[i] != w.ID {
			t.Fatalf("message %d is %s, want %s", i, got[i], w.ID)
		}
	}
	waitFor(t, 20*time.Second, "every row marked (or deleted) and no record left", func() bool {
		var n int
		must(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_relay_confirmed`).Scan(&n))
		return e.unpublished() == 0 && n == 0
	})
	if left := e.rows(); mode == config.OnPublishedDelete && left != 0 {
		t.Fatalf("%d rows left after every event was confirmed, in delete mode", left)
	}
	r.stop(t)
}

// TestSyncPublishCommitLatency measures RELAY_SYNC_PUBLISH: the relay is
// listed in synchronous_standby_names on purpose, so a COMMIT returns only
// once the broker confirmed its events. It asserts that (every committed
// row is marked or recorded when COMMIT returns), that nothing hangs and
// nothing is lost, and prints the commit latency at 100 and 1,000
// transactions/s, and of another database's commits, against the same
// load without synchronous replication. The figures are for the report,
// not asserted: this machine's 2 cores are shared.
func TestSyncPublishCommitLatency(t *testing.T) {
	testenv.Integration(t)
	c, e, _ := syncWorld(t)
	e.keep = false
	e.cfg.StatusInterval = time.Second
	e.cfg.MarkDelay = 20 * time.Millisecond
	e.cfg.SyncPublish = true
	ctx := context.Background()
	pool := func(url string, n int32) *pgxpool.Pool {
		pc, err := pgxpool.ParseConfig(url)
		must(t, err)
		pc.MaxConns = n
		p, err := pgxpool.NewWithConfig(ctx, pc)
		must(t, err)
		t.Cleanup(p.Close)
		return p
	}
	producers := pool(c.url("outbox"), 24)
	checks := pool(c.url("outbox"), 8)
	otherDB := pool(c.url("otherdb"), 2)

	rr := e.startWith(func(r *Relay) { r.opt.SyncCheckInterval = time.Second }, nil)
	rr.waitStreaming(t)

	// A COMMIT that returned: each of its rows is marked or recorded.
	confirmed := func(ids []string) error {
		var n int
		err := checks.QueryRow(ctx, `SELECT count(*) FROM outbox_events o WHERE o.id = ANY($1::uuid[])
			AND (o.published_at IS NOT NULL OR EXISTS (SELECT 1 FROM outbox_relay_confirmed c WHERE c.id = o.id))`, ids).Scan(&n)
		if err != nil {
			return err
		}
		if n != len(ids) {
			return fmt.Errorf("COMMIT returned before the relay had its events confirmed: %d of %d rows marked or recorded", n, len(ids))
		}
		return nil
	}
	var loads []*load
	run := func(what string, rate int, after func([]string) error) *load {
		phase := fmt.Sprintf("%s, %d tx/s", what, rate)
		producersN := max(4, rate/50)
		ld := runLoad(t, producers, otherDB, phase, 10*time.Second, loadOpts{txPerSec: rate, producers: producersN, after: after})
		if ld.failure != "" {
			t.Fatal(ld.failure)
		}
		loads = append(loads, ld)
		t.Logf("%-18s %4d tx/s asked, %4.0f achieved: outbox commits %s; other database %s", what, rate,
			float64(len(ld.outbox))/10, describe(ld.outbox), describe(ld.other))
		return ld
	}

	// Without synchronous replication: the floor.
	run("no sync standby", 100, nil)
	run("no sync standby", 1000, nil)

	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ("outbox-relay-test")'`, `SELECT pg_reload_conf()`)
	waitFor(t, 15*time.Second, "the relay to be the synchronous standby", func() bool {
		return c.syncStates()["outbox-relay-test"] == "sync"
	})
	waitFor(t, 10*time.Second, "the relay's metric and /readyz to say it is a synchronous standby on purpose", func() bool {
		return value(rr.metrics.SyncStandby.WithLabelValues("sync", "true")) == 1 &&
			strings.Contains(rr.metrics.Notice(), "on purpose (RELAY_SYNC_PUBLISH)")
	})
	run("RELAY_SYNC_PUBLISH", 100, confirmed)
	run("RELAY_SYNC_PUBLISH", 1000, nil)

	total := 0
	for _, ld := range loads {
		total += ld.events
	}
	waitAllMarked(t, e, total)
	func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, ld := range loads {
			for agg, ids := range ld.inserted {
				for _, id := range ids {
					if e.ids[id] == 0 {
						t.Errorf("event %s (aggregate %s) was never delivered", id, agg)
						return
					}
				}
			}
		}
	}()
	// Leave the cluster writable for the cleanups, which commit.
	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = ''`, `SELECT pg_reload_conf()`)
	rr.stop(t)
}

// TestSyncStandbyStepsAsideWhenTheBrokerStalls (invariant 12): the relay is
// the synchronous standby nobody asked for, and the broker stops
// confirming (as under a RabbitMQ memory alarm). Every commit in the
// cluster would wait for the broker; instead the relay leaves within its
// stall limit, the physical standby takes the role, and commits go on.
// Once the broker confirms again the relay comes back and delivers and
// marks everything.
func TestSyncStandbyStepsAsideWhenTheBrokerStalls(t *testing.T) {
	testenv.Integration(t)
	c, e, otherDB := syncWorld(t)
	ctx := context.Background()
	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = '*'`, `SELECT pg_reload_conf()`)
	waitFor(t, 15*time.Second, "standby1 to become the synchronous standby", func() bool {
		return c.syncStates()["standby1"] == "sync"
	})

	gate := make(chan struct{}) // confirms are held until it closes
	var rr *running
	c.run("standby-stop")
	rr = e.startWith(func(r *Relay) {
		r.opt.SyncCheckInterval = time.Second
		r.opt.SyncStallLimit = 2 * time.Second
		r.opt.SyncHoldOff = 3 * time.Second
	}, func(p sink.Publisher) sink.Publisher { return &gated{Publisher: p, open: gate} })
	rr.waitStreaming(t)
	c.run("standby-start")
	waitFor(t, 15*time.Second, "the relay to be the synchronous standby, standby1 potential", func() bool {
		s := c.syncStates()
		return s["outbox-relay-test"] == "sync" && s["standby1"] == "potential"
	})
	waitFor(t, 10*time.Second, "the relay to know it is the synchronous standby", func() bool {
		return value(rr.metrics.SyncStandby.WithLabelValues("sync", "false")) == 1
	})
	time.Sleep(1500 * time.Millisecond) // a check that has seen standby1 as a candidate

	evs := []event{newEvent("order", "created", `{}`), newEvent("order", "paid", `{}`)}
	t0 := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := commitWith(e.pool, func(tx pgx.Tx) error {
			for _, ev := range evs {
				if err := outbox.Insert(ctx, tx, outbox.Event{ID: ev.ID, AggregateType: ev.AggregateType,
					AggregateID: ev.AggregateID, EventType: ev.EventType, Payload: json.RawMessage(ev.Payload)}); err != nil {
					return err
				}
			}
			return nil
		})
		done <- err
	}()
	if err := <-done; err != nil {
		close(gate)
		t.Fatalf("an outbox commit while the broker held its confirms: %v", err)
	}
	took := time.Since(t0)
	t.Logf("outbox commit with the broker holding confirms took %s", took.Round(time.Millisecond))
	if took > 8*time.Second {
		t.Errorf("the commit waited %s for a relay whose broker did not confirm (stall limit 2s)", took)
	}
	// Meanwhile commits elsewhere go on without the relay.
	if took, err := commitWith(otherDB, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO other_writes (v) VALUES ('x')`)
		return err
	}); err != nil || took > time.Second {
		t.Errorf("a commit in another database took %s (%v) after the relay stepped aside", took, err)
	}
	// The commit returns as the walsender goes; the session that stepped
	// aside ends, and is counted, only after its drain gives up (its broker
	// still holds the confirms).
	waitFor(t, 20*time.Second, "the step-aside to be counted", func() bool {
		return value(rr.metrics.Retries.WithLabelValues("postgres", "sync_standby_step_aside")) >= 1
	})
	close(gate)
	waitFor(t, 60*time.Second, "both events delivered", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.ids[evs[0].ID] > 0 && e.ids[evs[1].ID] > 0
	})
	waitFor(t, 30*time.Second, "every row marked and no record left", func() bool {
		var n int
		must(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_relay_confirmed`).Scan(&n))
		return e.unpublished() == 0 && n == 0
	})
	order := e.receivedIDs()
	first := slices.Index(order, evs[0].ID)
	if second := slices.Index(order, evs[1].ID); first < 0 || second < first {
		t.Errorf("events arrived out of order: %v", order)
	}
}

// TestSyncStandbyUnderLeastPrivilege: the relay's role (as
// deploy/least-privilege.sql makes it, without pg_monitor) cannot read its
// walsender's sync_state, which pg_stat_replication shows as NULL (checked
// on PostgreSQL 15). With synchronous_standby_names = '*' the relay assumes
// it may be the synchronous standby (sync_state "unknown"), and commits do
// not hang when it is.
func TestSyncStandbyUnderLeastPrivilege(t *testing.T) {
	testenv.Integration(t)
	c, e, otherDB := syncWorld(t)
	e.keep = false
	c.sql("outbox", `CREATE ROLE outbox_relay_lp LOGIN REPLICATION`,
		`GRANT SELECT, UPDATE (published_at) ON outbox_events TO outbox_relay_lp`,
		`GRANT SELECT, INSERT, UPDATE ON outbox_relay_slot_state TO outbox_relay_lp`,
		`GRANT SELECT, INSERT, DELETE ON outbox_relay_confirmed TO outbox_relay_lp`)
	e.dbURL = strings.Replace(c.url("outbox"), "postgres@", "outbox_relay_lp@", 1) // the relay's connections only
	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = '*'`, `SELECT pg_reload_conf()`)
	waitFor(t, 15*time.Second, "standby1 to become the synchronous standby", func() bool {
		return c.syncStates()["standby1"] == "sync"
	})

	c.run("standby-stop")
	rr := e.startWith(func(r *Relay) { r.opt.SyncCheckInterval = time.Second }, nil)
	rr.waitStreaming(t)
	c.run("standby-start")
	waitFor(t, 15*time.Second, "the relay to be the synchronous standby", func() bool {
		s := c.syncStates()
		return s["outbox-relay-test"] == "sync" && s["standby1"] == "potential"
	})
	waitFor(t, 10*time.Second, "the relay to say it may be the synchronous standby (sync_state unknown)", func() bool {
		return value(rr.metrics.SyncStandby.WithLabelValues("unknown", "false")) == 1
	})
	ld := runLoad(t, e.pool, otherDB, "leastprivilege", 5*time.Second, defaultLoad)
	if ld.failure != "" {
		t.Fatal(ld.failure)
	}
	t.Logf("relay as synchronous standby without pg_monitor: outbox commits %s; other database %s",
		describe(ld.outbox), describe(ld.other))
	waitAllMarked(t, e, ld.events)
	rr.stop(t)
}
