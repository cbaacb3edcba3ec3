package relay

import (
	"context"
	"runtime"
	rtmetrics "runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/sink"
)

// liveHeap is the heap the process keeps after a full collection.
func liveHeap() uint64 {
	runtime.GC()
	s := []rtmetrics.Sample{{Name: "/gc/heap/live:bytes"}}
	rtmetrics.Read(s)
	return s[0].Value.Uint64()
}

// TestLargePayloadsBehindHeldConfirmsBoundedHeap (invariant 9): while the
// broker confirms nothing, the reader stops at RELAY_MAX_INFLIGHT_BYTES of
// payloads instead of filling RELAY_PUBLISH_WINDOW events of 1 MB each, and
// it keeps the replication stream alive while it waits. Once the confirms
// come, everything is delivered in order, exactly once.
func TestLargePayloadsBehindHeldConfirmsBoundedHeap(t *testing.T) {
	e := newEnv(t)
	e.keep = false
	e.cfg.MaxInflightBytes = 8 << 20
	var g *gated
	r := e.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	r.waitStreaming(t)

	const n = 100
	base := liveHeap()
	var ids []string
	for i := 0; i < n; i++ {
		ids = append(ids, newEvent("big", "loaded", "").ID)
	}
	_, err := e.pool.Exec(context.Background(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT id::uuid, 'big', gen_random_uuid(), 'loaded', jsonb_build_object('pad', repeat('x', 1000000))
		FROM unnest($1::text[]) AS id`, ids)
	must(t, err)

	// The reader has read what it may once the walsender stops sending.
	sent := func() string {
		var lsn string
		must(t, e.pool.QueryRow(context.Background(),
			`SELECT coalesce(sent_lsn::text, '') FROM pg_stat_replication WHERE application_name = 'outbox-relay-test'`).Scan(&lsn))
		return lsn
	}
	last, still := sent(), 0
	waitFor(t, 60*time.Second, "the reader to stop reading", func() bool {
		time.Sleep(200 * time.Millisecond)
		now := sent()
		if now == last {
			still++
		} else {
			last, still = now, 0
		}
		return still >= 5
	})
	live := liveHeap()
	live -= min(base, live)
	t.Logf("live heap with confirms held: %d MiB above the start (in-flight bound %d MiB, %d events of 1 MB)",
		live>>20, e.cfg.MaxInflightBytes>>20, n)
	if live > 40<<20 {
		t.Fatalf("live heap %d MiB above the start with confirms held: payloads in flight not bounded by RELAY_MAX_INFLIGHT_BYTES (%d MiB)",
			live>>20, e.cfg.MaxInflightBytes>>20)
	}

	// Waiting for room, the reader still sends status updates (every
	// 100 ms here), so the walsender never times it out.
	var before, after time.Time
	must(t, e.pool.QueryRow(context.Background(),
		`SELECT reply_time FROM pg_stat_replication WHERE application_name = 'outbox-relay-test'`).Scan(&before))
	waitFor(t, 10*time.Second, "a status update while the reader waits", func() bool {
		must(t, e.pool.QueryRow(context.Background(),
			`SELECT reply_time FROM pg_stat_replication WHERE application_name = 'outbox-relay-test'`).Scan(&after))
		return after.After(before)
	})

	close(g.open)
	e.checkReceivedInOrder(ids)
	r.stop(t)
}

// TestEventsLargerThanTheInflightBoundPassAlone: an event bigger than
// RELAY_MAX_INFLIGHT_BYTES is not stuck forever; it goes through the
// pipeline alone, and the stream goes on in order.
func TestEventsLargerThanTheInflightBoundPassAlone(t *testing.T) {
	e := newEnv(t)
	e.cfg.MaxInflightBytes = 1000
	r := e.start(nil)
	r.waitStreaming(t)
	big := `{"pad": "` + strings.Repeat("x", 5000) + `"}` // as jsonb prints it
	var events []event
	for i := 0; i < 6; i++ {
		payload := big
		if i%2 == 1 {
			payload = `{"small": true}`
		}
		events = append(events, newEvent("order", "created", payload))
	}
	e.insertTx(events[:3], true, nil)
	e.insertTx(events[3:], true, nil)
	e.waitReceived(len(events), 30*time.Second)
	waitFor(t, 20*time.Second, "all rows marked", func() bool { return e.unpublished() == 0 })
	got := e.deliveries()
	if len(got) != len(events) {
		t.Fatalf("received %d messages, want %d", len(got), len(events))
	}
	for i, ev := range events {
		if got[i].MessageId != ev.ID || string(got[i].Body) != ev.Payload {
			t.Fatalf("message %d is %s (%d bytes), want %s (%d bytes)", i, got[i].MessageId, len(got[i].Body), ev.ID, len(ev.Payload))
		}
	}
	r.stop(t)
}
