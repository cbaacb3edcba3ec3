//go:build faults

package faulttest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestPrimaryFailoverAndFailback: the relay runs on a multi-host URL
// (target_session_attrs=read-write) over a primary and a synchronous
// standby of the test's own. Under load the primary dies (-m immediate),
// the standby is promoted, and the relay finds the new primary with no
// slot (PostgreSQL 15 has no failover slots): it creates one, sweeps the
// table and streams. The old primary comes back as a standby of the new
// one (a fresh basebackup) and the same happens the other way. Every row
// committed is delivered and marked on the last primary; duplicates are
// what was published but whose marks had not reached the standby.
func TestPrimaryFailoverAndFailback(t *testing.T) {
	c := startCluster(t, "SYNC=on")
	c.sql("postgres", `CREATE DATABASE outbox`)
	multi := fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/outbox?sslmode=disable&target_session_attrs=read-write",
		c.primary, c.standbyP)
	w := newWorldAt(t, multi)
	relay := w.startRelay()
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(60*time.Second, "events before the first failover", func() bool { return w.received() > 200 })

	type round struct {
		name              string
		firstEvent, total time.Duration
	}
	var rounds []round
	for _, name := range []string{"failover", "failback"} {
		before := w.received()
		died := time.Now()
		c.run("pg-crash")
		c.run("pg-promote")
		// A probe written on the new primary as soon as it takes writes:
		// the time to its delivery is the time to the first event
		// through the new primary.
		probe := uuid.NewString()
		w.waitFor(60*time.Second, "the new primary to take a write", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err := w.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
				VALUES ($1, 'probe', $1, 'probe', '{}')`, probe)
			return err == nil
		})
		w.waitFor(90*time.Second, "the probe through the new primary", func() bool {
			w.mu.Lock()
			defer w.mu.Unlock()
			return w.seen[probe] > 0
		})
		first := time.Since(died)
		w.waitFor(60*time.Second, "events after the "+name, func() bool { return w.received() > before+200 })
		rounds = append(rounds, round{name, first, time.Since(died)})
		c.run("pg-rejoin")
	}
	prod.halt()
	events, lost, dups := w.verify(90 * time.Second)
	if committed := int(prod.n.Load()); events < committed {
		t.Fatalf("the last primary holds %d rows, but the producer saw %d commits succeed: synchronous replication lost some", events, committed)
	}
	// Once at the start, and once on each new primary.
	if n := strings.Count(relay.out.String(), "created replication slot"); n != 3 {
		t.Fatalf("the relay created its slot %d times, want 3 (at the start and on each new primary)", n)
	}
	if lost != 0 {
		t.Fatalf("%d of %d events lost", lost, events)
	}
	for _, r := range rounds {
		t.Logf("primary %s: first event through the new primary %.1f s after the old one died; 200 more events by %.1f s",
			r.name, r.firstEvent.Seconds(), r.total.Seconds())
	}
	t.Logf("failover and failback: %d events, %d lost, %d duplicated", events, lost, dups)
}
