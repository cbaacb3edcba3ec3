package relay

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/outbox-relay/outbox-relay/sink"
)

// sweepRow is one row a sweep test writes with SQL of its own: any id, any
// occurred_at.
type sweepRow struct {
	id, agg, occurredAt string // occurredAt: an SQL expression
}

// insertRows writes each transaction's rows in order, one INSERT each.
func (e *env) insertRows(txs [][]sweepRow) {
	e.t.Helper()
	ctx := context.Background()
	for _, rows := range txs {
		tx, err := e.pool.Begin(ctx)
		must(e.t, err)
		for _, r := range rows {
			_, err := tx.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, occurred_at)
				VALUES (`+r.id+`, 'order', $1, 'changed', '{}', `+r.occurredAt+`)`, r.agg)
			must(e.t, err)
		}
		must(e.t, tx.Commit(ctx))
	}
}

// TestSweepKeepsInsertOrder (invariant 3 on the sweep): the rows a new slot
// will never deliver are published in the order they were written, per
// aggregate and overall, whatever their ids (random v4, decreasing) and
// whatever occurred_at holds (ties within a transaction, the past, the
// future). Ordering by occurred_at, id reorders all of these.
func TestSweepKeepsInsertOrder(t *testing.T) {
	e := newEnv(t)
	aggs := []string{
		"20000000-0000-4000-8000-000000000001",
		"20000000-0000-4000-8000-000000000002",
		"20000000-0000-4000-8000-000000000003",
	}
	var txs [][]sweepRow
	n := 0
	for i := 0; i < 30; i++ {
		var rows []sweepRow
		for j := 0; j < 1+i%4; j++ {
			n++
			r := sweepRow{agg: aggs[(i+j)%len(aggs)], occurredAt: "now()"} // ties within the transaction
			switch i % 3 {
			case 0:
				r.id = "gen_random_uuid()"
			default:
				// Decreasing ids.
				r.id = fmt.Sprintf("'%08x-0000-4000-8000-000000000000'", 0xffffffff-n)
			}
			switch i % 5 {
			case 1:
				r.occurredAt = fmt.Sprintf("now() - interval '%d days'", 1000-i) // the past, increasing
			case 2:
				r.occurredAt = fmt.Sprintf("now() + interval '%d years'", 100-i) // the future, decreasing
			case 3:
				r.occurredAt = "'2000-01-01 00:00:00+00'" // equal across transactions
			}
			rows = append(rows, r)
		}
		txs = append(txs, rows)
	}
	e.insertRows(txs)
	var want []string
	rows, err := e.pool.Query(context.Background(), `SELECT id::text FROM outbox_events ORDER BY relay_seq`)
	must(t, err)
	for rows.Next() {
		var id string
		must(t, rows.Scan(&id))
		want = append(want, id)
	}
	must(t, rows.Err())
	if len(want) != n {
		t.Fatalf("%d rows written, want %d", len(want), n)
	}

	r := e.start(nil)
	r.waitStreaming(t)
	e.waitReceived(n, 30*time.Second)
	got := e.receivedIDs()
	if len(got) != n {
		t.Fatalf("received %d messages, want %d", len(got), n)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("swept message %d is %s, want %s (the insert order)", i, got[i], want[i])
		}
	}
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// TestSweepDeadLettersWhatTheStreamWould (invariant 8 on the sweep): rows
// whose occurred_at the stream dead-letters (infinity, -infinity, a BC
// date) are dead-lettered and marked by the sweep too; they used to fail
// the sweep's scan, and the relay never reached streaming.
func TestSweepDeadLettersWhatTheStreamWould(t *testing.T) {
	e := newEnv(t)
	agg := "30000000-0000-4000-8000-000000000001"
	poison := []string{"'infinity'", "'-infinity'", "'4713-01-01 00:00:00+00 BC'"}
	var txs [][]sweepRow
	var healthy []string
	for i, at := range poison {
		id := fmt.Sprintf("'00000000-0000-4000-8000-%012d'", 900+i)
		txs = append(txs, []sweepRow{{id: id, agg: agg, occurredAt: at}})
		ok := fmt.Sprintf("00000000-0000-4000-8000-%012d", 950+i)
		healthy = append(healthy, ok)
		txs = append(txs, []sweepRow{{id: "'" + ok + "'", agg: agg, occurredAt: "now()"}})
	}
	e.insertRows(txs)

	r := e.start(nil)
	r.waitStreaming(t)
	after := newEvent("order", "created", `{}`)
	e.insertTx([]event{after}, true, nil)
	e.waitReceived(len(healthy)+1, 20*time.Second)
	got := e.receivedIDs()
	want := append(healthy, after.ID)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("received %v, want %v", got, want)
	}
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	dead := e.dlq()
	if len(dead) != len(poison) {
		t.Fatalf("dead-letter queue has %d messages, want %d", len(dead), len(poison))
	}
	for _, d := range dead {
		if reason, _ := d.Headers["x-outbox-reason"].(string); !strings.Contains(reason, "occurred_at") {
			t.Fatalf("dead-letter reason for %s is %q, want one naming occurred_at", d.MessageId, reason)
		}
	}
	r.stop(t)
}

// slowed publishes each message only after a pause: a sweep that takes
// seconds.
type slowed struct {
	sink.Publisher
	pause time.Duration
}

func (s slowed) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	time.Sleep(s.pause)
	return s.Publisher.Publish(ctx, m)
}

// TestStandbyWaitsForTheSweepingOwner (invariant 10): a standby started
// while the owner sweeps a backlog (its slot shows active = false the whole
// time) neither drops, creates nor sweeps the slot: nothing is sent twice,
// and after the owner stops the standby streams what follows, once.
func TestStandbyWaitsForTheSweepingOwner(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	const n = 3000
	_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'legacy', gen_random_uuid(), 'imported', '{}' FROM generate_series(1, $1)`, n)
	must(t, err)
	owner := e.start(func(p sink.Publisher) sink.Publisher { return slowed{p, 2 * time.Millisecond} })
	waitFor(t, 20*time.Second, "the sweep to start", func() bool { return e.receivedCount() > 0 })
	standby := e.start(nil)
	waitFor(t, 10*time.Second, "the second relay to stand by", func() bool {
		return strings.HasPrefix(standby.metrics.Ready(), "standby")
	})
	if got := e.receivedCount(); got >= n {
		t.Fatalf("the sweep was over (%d events) before the standby started: the test proves nothing", got)
	}
	owner.waitStreaming(t)
	waitFor(t, 30*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	after := newEvent("order", "created", `{}`)
	e.insertTx([]event{after}, true, nil)
	e.waitReceived(n+1, 20*time.Second)
	owner.stop(t)
	standby.waitStreaming(t)
	last := newEvent("order", "paid", `{}`)
	e.insertTx([]event{last}, true, nil)
	e.waitReceived(n+2, 20*time.Second)
	time.Sleep(300 * time.Millisecond)
	e.mu.Lock()
	defer e.mu.Unlock()
	for id, times := range e.ids {
		if times != 1 {
			t.Errorf("event %s received %d times", id, times)
		}
	}
	if len(e.ids) != n+2 {
		t.Fatalf("%d distinct events received, want %d", len(e.ids), n+2)
	}
}

// TestUnroutableRetryHoldsTheStreamBehindTheWindow pins what
// RELAY_UNROUTABLE=retry does: events already published behind the
// unroutable one (at most RELAY_PUBLISH_WINDOW + 1) reach their queues
// before it, then nothing more is published until a queue is bound for it;
// then it arrives, and everything behind it, and every row is marked.
func TestUnroutableRetryHoldsTheStreamBehindTheWindow(t *testing.T) {
	e := newEnv(t)
	e.cfg.Unroutable = "retry"
	e.cfg.PublishWindow = 3
	ch := e.bindOnly("order.*")
	r := e.start(nil)
	r.waitStreaming(t)
	held := newEvent("invoice", "created", `{}`)
	e.insertTx([]event{held}, true, nil)
	var behind []event
	for i := 0; i < 20; i++ {
		ev := newEvent("order", "created", fmt.Sprintf(`{"i":%d}`, i))
		behind = append(behind, ev)
		e.insertTx([]event{ev}, true, nil)
	}
	waitFor(t, 10*time.Second, "the retries to begin", func() bool {
		return testutil.ToFloat64(r.metrics.Retries.WithLabelValues("rabbitmq", "unroutable")) > 0
	})
	time.Sleep(time.Second) // whatever more would pass, passes now
	passed := e.receivedCount()
	if passed > e.cfg.PublishWindow+1 {
		t.Fatalf("%d events delivered behind the held one, want at most RELAY_PUBLISH_WINDOW + 1 = %d",
			passed, e.cfg.PublishWindow+1)
	}
	if e.unpublished() != len(behind)+1 {
		t.Fatalf("%d rows unpublished while the stream is held, want all %d", e.unpublished(), len(behind)+1)
	}
	must(t, ch.QueueBind(e.queue, "invoice.*", e.cfg.Exchange, false, nil))
	e.waitReceived(len(behind)+1, 30*time.Second)
	got := e.receivedIDs()
	if got[passed] != held.ID {
		t.Fatalf("message %d is %s, want the held event once its queue was bound", passed, got[passed])
	}
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// TestOddPayloadsOnBothPaths: payloads that are JSON but not objects, deeply
// nested, multibyte or large arrive byte for byte as stored (payload::text),
// swept or streamed alike.
func TestOddPayloadsOnBothPaths(t *testing.T) {
	e := newEnv(t)
	payloads := []string{
		`null`, `"a bare string"`, `0`, `[]`, `{}`, `true`,
		strings.Repeat("[", 1000) + strings.Repeat("]", 1000),
		`{"emoji":"🦀","cjk":"漢字","nul_escape":"\u0000"}`,
		`{"pad":"` + strings.Repeat("ü", 300_000) + `"}`,
	}
	insert := func(prefix int) []string {
		var ids []string
		for i, p := range payloads {
			id := fmt.Sprintf("00000000-0000-4000-8000-%06d%06d", prefix, i)
			_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
				VALUES ($1, 'odd', gen_random_uuid(), 'payload', $2::jsonb)`, id, p)
			if err != nil && strings.Contains(p, `\u0000`) {
				continue // jsonb refuses \u0000: not a row anyone can write
			}
			must(t, err)
			ids = append(ids, id)
		}
		return ids
	}
	swept := insert(1)
	r := e.start(nil)
	r.waitStreaming(t)
	streamed := insert(2)
	want := append(swept, streamed...)
	e.waitReceived(len(want), 30*time.Second)
	for i, d := range e.deliveries() {
		if d.MessageId != want[i] {
			t.Fatalf("message %d is %s, want %s", i, d.MessageId, want[i])
		}
		var stored string
		must(t, e.pool.QueryRow(context.Background(), `SELECT payload::text FROM outbox_events WHERE id = $1`, want[i]).Scan(&stored))
		if string(d.Body) != stored {
			t.Fatalf("message %s: body of %d bytes differs from the stored payload::text of %d bytes", d.MessageId, len(d.Body), len(stored))
		}
	}
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// TestLosingTheOwnerLockEndsTheSession: when the connection that holds the
// slot's ownership lock ends, the relay may no longer be the only owner;
// its session ends, and the next one takes the lock again and streams.
func TestLosingTheOwnerLockEndsTheSession(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	r.waitStreaming(t)
	var ended bool
	must(t, e.pool.QueryRow(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = $1 AND datname = current_database()`, ownerApplicationName).Scan(&ended))
	if !ended {
		t.Fatal("no session holds the slot's ownership lock")
	}
	waitFor(t, 10*time.Second, "the session to end", func() bool {
		return testutil.ToFloat64(r.metrics.Reconnects.WithLabelValues("postgres")) > 0
	})
	r.waitStreaming(t)
	ev := newEvent("order", "created", `{}`)
	e.insertTx([]event{ev}, true, nil)
	e.waitReceived(1, 20*time.Second)
	r.stop(t)
}

// TestSweepTakesPre004RowsFirst: rows written before migration 004 (no
// relay_seq) are swept first, by occurred_at then id, and the numbered rows
// after them in insert order.
func TestSweepTakesPre004RowsFirst(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	var txs [][]sweepRow
	for i := 0; i < 6; i++ {
		txs = append(txs, []sweepRow{{
			id:         fmt.Sprintf("'00000000-0000-4000-8000-%012d'", 100-i),
			agg:        "40000000-0000-4000-8000-000000000001",
			occurredAt: fmt.Sprintf("'2020-01-01 00:00:%02d+00'", 5-i), // decreasing: only the legacy rows go by it
		}})
	}
	e.insertRows(txs[:3])
	// As if written before the migration.
	_, err := e.pool.Exec(ctx, `UPDATE outbox_events SET relay_seq = NULL`)
	must(t, err)
	e.insertRows(txs[3:])
	want := []string{ // the legacy three by occurred_at, then the numbered ones by insert order
		"00000000-0000-4000-8000-000000000098", "00000000-0000-4000-8000-000000000099", "00000000-0000-4000-8000-000000000100",
		"00000000-0000-4000-8000-000000000097", "00000000-0000-4000-8000-000000000096", "00000000-0000-4000-8000-000000000095",
	}
	r := e.start(nil)
	r.waitStreaming(t)
	e.waitReceived(len(want), 20*time.Second)
	if got := e.receivedIDs(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("swept %v, want %v", got, want)
	}
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// TestLosingTheOwnerLockMidSweep (invariants 10, 2, 4): when the ownership
// lock's session ends during the table sweep, a standby could now take the
// lock and sweep the inactive slot, so the session halts at once (reads
// and publishes nothing more), without recording the sweep as done; the
// next one sweeps again and nothing is lost. What was in flight is
// confirmed and carried, not published again: cancelling the pipeline
// instead published it twice.
func TestLosingTheOwnerLockMidSweep(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	const n = 2000
	_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'legacy', gen_random_uuid(), 'imported', '{}' FROM generate_series(1, $1)`, n)
	must(t, err)
	r := e.start(func(p sink.Publisher) sink.Publisher { return slowed{p, 2 * time.Millisecond} })
	waitFor(t, 20*time.Second, "the sweep to start", func() bool { return e.receivedCount() > 0 })
	var ended bool
	must(t, e.pool.QueryRow(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = $1 AND datname = current_database()`, ownerApplicationName).Scan(&ended))
	if got := e.receivedCount(); got >= n || !ended {
		t.Fatalf("lock session ended %v with %d of %d swept: the test proves nothing", ended, got, n)
	}
	waitFor(t, 10*time.Second, "the session to end", func() bool {
		return testutil.ToFloat64(r.metrics.Reconnects.WithLabelValues("postgres")) > 0
	})
	r.waitStreaming(t)
	waitFor(t, 60*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
	e.mu.Lock()
	distinct, total := len(e.ids), 0
	for _, c := range e.ids {
		total += c
	}
	e.mu.Unlock()
	if distinct != n {
		t.Fatalf("%d distinct events received, want %d", distinct, n)
	}
	if total != n {
		t.Fatalf("%d deliveries of %d events: what the halted sweep had in flight was published again", total, n)
	}
	if e.sweepPendingState() {
		t.Fatal("the sweep is still recorded as pending")
	}
}
