package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/metrics"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestStreamsExactlyTheCommittedEventsInOrder: transactions of mixed sizes,
// writes to another table in and between them, rolled-back transactions.
// Exactly the committed events arrive, in commit and insert order, intact,
// every row is marked and the slot is acknowledged past the last commit
// (invariants 1, 2, 3).
func TestStreamsExactlyTheCommittedEventsInOrder(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	r.waitStreaming(t)

	payloads := []string{`{"n":1}`, `null`, `[1,2,3]`, `"str"`, `1e3`, `{"deep":{"a":[{"b":{"c":[1,{"d":"é✓"}]}}]}}`, `{"unicode":"日本語 \u00e9"}`}
	var want []event
	sizes := []int{1, 3, 17, 1, 120, 2, 1, 40}
	extra := func(tx pgx.Tx) error {
		_, err := tx.Exec(context.Background(), `INSERT INTO other (v) VALUES ('x')`)
		return err
	}
	for i, n := range sizes {
		var evs []event
		for j := 0; j < n; j++ {
			evs = append(evs, newEvent([]string{"order", "customer"}[j%2], []string{"created", "paid"}[i%2], payloads[(i+j)%len(payloads)]))
		}
		if i%3 == 2 {
			// A rolled-back transaction is never published.
			rolled := []event{newEvent("order", "cancelled", `{}`), newEvent("order", "cancelled", `{}`)}
			e.insertTx(rolled, false, extra)
		}
		e.insertTx(evs, true, extra)
		want = append(want, evs...)
		_, err := e.pool.Exec(context.Background(), `INSERT INTO other (v) SELECT 'y' FROM generate_series(1, 50)`)
		must(t, err)
	}
	lastCommit := e.currentLSN()

	e.waitReceived(len(want), 30*time.Second)
	time.Sleep(300 * time.Millisecond) // anything extra would arrive now
	got := e.deliveries()
	if len(got) != len(want) {
		t.Fatalf("received %d messages, want exactly %d", len(got), len(want))
	}
	for i, d := range got {
		w := want[i]
		if d.MessageId != w.ID {
			t.Fatalf("message %d is %s, want %s: order broken", i, d.MessageId, w.ID)
		}
		checkMessage(t, d, w, e.cfg.Exchange)
		// The time properties carry the row's occurred_at, not the
		// publish time.
		var stored time.Time
		must(t, e.pool.QueryRow(context.Background(), `SELECT occurred_at FROM outbox_events WHERE id = $1`, w.ID).Scan(&stored))
		occ, _ := d.Headers["occurred_at"].(string)
		if ts, err := time.Parse(time.RFC3339Nano, occ); err != nil || !ts.Equal(stored) || !d.Timestamp.Equal(stored.Truncate(time.Second)) {
			t.Fatalf("%s: occurred_at header %q, timestamp %v; the row's occurred_at is %v", w.ID, occ, d.Timestamp, stored)
		}
	}
	waitFor(t, 10*time.Second, "all rows marked", func() bool { return e.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot acknowledged past the last commit", func() bool { return e.slotPast(lastCommit) })
	r.stop(t)
}

// checkMessage asserts the message format of the contract.
func checkMessage(t *testing.T, d amqp.Delivery, w event, exchange string) {
	t.Helper()
	var want, got any
	must(t, json.Unmarshal([]byte(w.Payload), &want))
	if err := json.Unmarshal(d.Body, &got); err != nil {
		t.Fatalf("%s: body %q is not JSON: %v", w.ID, d.Body, err)
	}
	if fmt.Sprint(want) != fmt.Sprint(got) {
		t.Fatalf("%s: body %s, want %s", w.ID, d.Body, w.Payload)
	}
	if d.Exchange != exchange || d.RoutingKey != w.AggregateType+"."+w.EventType {
		t.Fatalf("%s: exchange %q key %q", w.ID, d.Exchange, d.RoutingKey)
	}
	if d.Type != w.EventType || d.ContentType != "application/json" || d.DeliveryMode != amqp.Persistent || d.AppId != "outbox-relay" {
		t.Fatalf("%s: properties type=%q content_type=%q delivery_mode=%d app_id=%q", w.ID, d.Type, d.ContentType, d.DeliveryMode, d.AppId)
	}
	if d.Timestamp.IsZero() || time.Since(d.Timestamp) > time.Hour {
		t.Fatalf("%s: timestamp %v", w.ID, d.Timestamp)
	}
	if d.Headers["aggregate_type"] != w.AggregateType || d.Headers["aggregate_id"] != w.AggregateID {
		t.Fatalf("%s: headers %v", w.ID, d.Headers)
	}
	// AMQP timestamps have whole seconds; the header keeps the fraction.
	occ, _ := d.Headers["occurred_at"].(string)
	if ts, err := time.Parse(time.RFC3339Nano, occ); err != nil || !ts.Truncate(time.Second).Equal(d.Timestamp) {
		t.Fatalf("%s: occurred_at header %q (timestamp %v)", w.ID, occ, d.Timestamp)
	}
}

// TestPayloadByteExact: the body is the stored JSON text, byte for byte.
func TestPayloadByteExact(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	big := `{"blob":"` + strings.Repeat("x", 1<<20) + `"}`
	cases := []string{`{"a": 1, "b": [true, false, null]}`, `null`, `[]`, `"✓ naïve"`, `-12.5e-3`, big}
	var evs []event
	for _, p := range cases {
		evs = append(evs, newEvent("doc", "stored", p))
	}
	e.insertTx(evs, true, nil)
	e.waitReceived(len(evs), 30*time.Second)
	for i, d := range e.deliveries() {
		var stored string
		must(t, e.pool.QueryRow(context.Background(), `SELECT payload::text FROM outbox_events WHERE id = $1`, evs[i].ID).Scan(&stored))
		if string(d.Body) != stored {
			t.Fatalf("payload %d: body differs from the stored JSON (%d vs %d bytes)", i, len(d.Body), len(stored))
		}
	}
	r.stop(t)
}

// TestRestartResumes: events inserted while the relay is stopped arrive
// after it starts again; nothing confirmed before is sent again.
func TestRestartResumes(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	r.waitStreaming(t)
	var first []event
	for i := 0; i < 10; i++ {
		first = append(first, newEvent("order", "created", `{}`))
	}
	e.insertTx(first, true, nil)
	e.waitReceived(10, 20*time.Second)
	waitFor(t, 10*time.Second, "first batch acknowledged", func() bool { return e.slotPast(e.currentLSN()) })
	r.stop(t)

	var second []event
	for i := 0; i < 20; i++ {
		second = append(second, newEvent("order", "paid", `{}`))
	}
	for i := 0; i < 20; i += 5 {
		e.insertTx(second[i:i+5], true, nil)
	}
	r = e.start(nil)
	e.waitReceived(30, 20*time.Second)
	time.Sleep(500 * time.Millisecond)
	got := e.deliveries()
	if len(got) != 30 {
		t.Fatalf("received %d messages, want 30 (duplicates after restart?)", len(got))
	}
	for i, w := range append(first, second...) {
		if got[i].MessageId != w.ID {
			t.Fatalf("message %d is %s, want %s", i, got[i].MessageId, w.ID)
		}
	}
	waitFor(t, 10*time.Second, "all rows marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// TestStopDoesNotWaitForTheStatusInterval: a stop wakes the replication
// receive; with a 30 s status interval and an idle outbox, the relay would
// otherwise sit in its receive until the interval ends.
func TestStopDoesNotWaitForTheStatusInterval(t *testing.T) {
	e := newEnv(t)
	e.cfg.StatusInterval = 30 * time.Second
	e.cfg.PostgresTimeout = time.Minute
	r := e.start(nil)
	r.waitStreaming(t)
	// The acknowledgement to wait for is the event's commit. A WAL position
	// read after the commit (or after the stop) may lie past it, by WAL
	// other tests write, and only a keepalive 30 s away would move the slot
	// there: read the insert position inside the transaction instead, which
	// the commit's end lies strictly past.
	ev := newEvent("order", "created", `{}`)
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	must(t, err)
	must(t, outbox.Insert(ctx, tx, outbox.Event{ID: ev.ID, AggregateType: ev.AggregateType,
		AggregateID: ev.AggregateID, EventType: ev.EventType, Payload: json.RawMessage(ev.Payload)}))
	var beforeCommit string
	must(t, tx.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&beforeCommit))
	must(t, tx.Commit(ctx))
	e.waitReceived(1, 20*time.Second)
	waitFor(t, 10*time.Second, "the row marked", func() bool { return e.unpublished() == 0 })
	// The receive that follows has a deadline up to 30 s away.
	time.Sleep(200 * time.Millisecond)
	began := time.Now()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("Run returned %v after stop", err)
		}
		r.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not stop within 10 s of the signal: its receive waited for the status interval")
	}
	t.Logf("stopped %s after the signal", time.Since(began).Round(time.Millisecond))
	// The final acknowledgement still went out: with a 30 s interval no
	// other status update reaches the server in this test's time.
	waitFor(t, 10*time.Second, "the slot to pass the event's commit", func() bool { return e.slotPast(beforeCommit) })
}

// TestLargeTransactionBoundedMemory: one transaction of 100,000 events is
// streamed in order while the relay's heap stays bounded (invariant 9).
func TestLargeTransactionBoundedMemory(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	r := e.start(nil)
	r.waitStreaming(t)

	const n = 100_000
	// About 1 KB per event: held all at once, 100,000 of them need over 100 MB.
	_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT ('00000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, 'bulk', gen_random_uuid(), 'loaded',
			jsonb_build_object('i', i, 'pad', repeat('p', 1000))
		FROM generate_series(1, $1) AS i`, n)
	must(t, err)

	// Sample the live heap (as of the last GC): it holds what the process
	// really keeps, not garbage waiting for collection.
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			metrics.Read(sample)
			if v := sample[0].Value.Uint64(); v > peak.Load() {
				peak.Store(v)
			}
		}
	}()
	e.waitReceived(n, 4*time.Minute)
	close(stop)
	<-sampled
	got := e.receivedIDs()
	for i := 0; i < n; i++ {
		if want := fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1); got[i] != want {
			t.Fatalf("message %d is %s, want %s", i, got[i], want)
		}
	}
	waitFor(t, 30*time.Second, "all rows marked", func() bool { return e.unpublished() == 0 })
	// The relay holds a few windows of 1,000 events (a few MiB); a relay
	// that buffered the transaction would hold over 100 MiB.
	if p := peak.Load(); p > 48<<20 {
		t.Fatalf("peak live heap %d MiB while streaming one transaction of %d events: memory not bounded", p>>20, n)
	} else {
		t.Logf("peak live heap: %d MiB", p>>20)
	}
	r.stop(t)
}

// TestAlterTableWhileRunning: columns are found by name; adding and
// dropping columns mid-stream changes nothing for the relay.
func TestAlterTableWhileRunning(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	r.waitStreaming(t)
	a := newEvent("order", "created", `{"v":1}`)
	e.insertTx([]event{a}, true, nil)
	ctx := context.Background()
	_, err := e.pool.Exec(ctx, `ALTER TABLE outbox_events ADD COLUMN tenant text NOT NULL DEFAULT 'acme'`)
	must(t, err)
	b := newEvent("order", "updated", `{"v":2}`)
	_, err = e.pool.Exec(ctx, `INSERT INTO outbox_events (tenant, payload, event_type, aggregate_id, aggregate_type, id)
		VALUES ('globex', $1, $2, $3, $4, $5)`, b.Payload, b.EventType, b.AggregateID, b.AggregateType, b.ID)
	must(t, err)
	_, err = e.pool.Exec(ctx, `ALTER TABLE outbox_events DROP COLUMN tenant`)
	must(t, err)
	c := newEvent("order", "paid", `{"v":3}`)
	e.insertTx([]event{c}, true, nil)
	e.waitReceived(3, 20*time.Second)
	for i, w := range []event{a, b, c} {
		d := e.deliveries()[i]
		if d.MessageId != w.ID {
			t.Fatalf("message %d is %s, want %s", i, d.MessageId, w.ID)
		}
		checkMessage(t, d, w, e.cfg.Exchange)
	}
	waitFor(t, 10*time.Second, "all rows marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// TestStopEndsAtACommit: a graceful stop in the middle of a transaction
// reads on to its commit, so the final acknowledgement covers it and the
// next process replays nothing of it. Cut short, the transaction was
// replayed whole, and the replay filter cannot tell a row deleted since
// from an unpublished one (the simulator, seed 2163).
func TestStopEndsAtACommit(t *testing.T) {
	e := newEnv(t)
	e.cfg.PublishWindow = 1 // one confirm round trip per event: the stop lands mid-transaction
	r := e.start(nil)
	r.waitStreaming(t)
	var events []event
	for i := 0; i < 1000; i++ {
		events = append(events, newEvent("order", "created", fmt.Sprintf(`{"n":%d}`, i)))
	}
	e.insertTx(events, true, nil)
	waitFor(t, 20*time.Second, "the transaction's first events", func() bool { return e.receivedCount() >= 10 })
	r.stop(t)
	// The consumer may lag the broker a little; the relay has stopped.
	deadline := time.Now().Add(5 * time.Second)
	for e.receivedCount() < len(events) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := e.receivedCount(); got != len(events) {
		t.Fatalf("the stop published %d of the transaction's %d events; want all: it ends at the commit", got, len(events))
	}
	if n := e.unpublished(); n != 0 {
		t.Fatalf("%d rows of the transaction not marked after the stop", n)
	}
	e.exactlyOnce(events)
}
