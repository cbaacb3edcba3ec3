package relay

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestNoPhantomEventsWhileTheStandbyLags: with synchronous replication, a
// transaction whose COMMIT still waits for the standby is on the primary's
// disk only, and the logical walsender sends it already. A failover now
// would lose the row, so its event must not be published yet: the relay
// waits for the synchronous standby (RELAY_WAIT_FOR_SYNC_STANDBY), even
// when someone cancels its wait on the server, and publishes once the
// standby has the commit. The same steps with the wait off show that the
// walsender did send the uncommitted-on-the-standby event, so the first
// half can fail.
func TestNoPhantomEventsWhileTheStandbyLags(t *testing.T) {
	testenv.Integration(t)
	c, e, _ := syncWorld(t)
	ctx := context.Background()
	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = 'standby1'`, `SELECT pg_reload_conf()`)
	waitFor(t, 15*time.Second, "standby1 to be the synchronous standby", func() bool {
		return c.syncStates()["standby1"] == "sync"
	})

	// commitBlocked commits one event while the standby is down; the commit
	// returns once the standby is back.
	commitBlocked := func() (event, chan error) {
		ev := newEvent("order", "created", `{}`)
		done := make(chan error, 1)
		go func() {
			_, err := commitWith(e.pool, func(tx pgx.Tx) error {
				return outbox.Insert(ctx, tx, outbox.Event{ID: ev.ID, AggregateType: ev.AggregateType,
					AggregateID: ev.AggregateID, EventType: ev.EventType, Payload: json.RawMessage(ev.Payload)})
			})
			done <- err
		}()
		return ev, done
	}
	got := func(ev event) bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.ids[ev.ID] > 0
	}

	for _, wait := range []bool{true, false} {
		rr := e.startWith(func(r *Relay) { r.cfg.WaitForSyncStandby = wait }, nil)
		rr.waitStreaming(t)
		first := newEvent("order", "created", `{}`)
		e.insertTx([]event{first}, true, nil)
		waitFor(t, 30*time.Second, "an event with the standby up", func() bool { return got(first) })

		c.run("standby-stop")
		ev, done := commitBlocked()
		if !wait {
			// The walsender sends the commit the standby does not have.
			waitFor(t, 30*time.Second, "the event of a commit still waiting for the standby (the wait off)", func() bool { return got(ev) })
			c.run("standby-start")
			must(t, <-done)
			rr.stop(t)
			break
		}
		time.Sleep(2 * time.Second)
		if got(ev) {
			t.Fatal("published an event whose COMMIT still waited for the synchronous standby: a failover now would leave a phantom event")
		}
		// Someone cancels the barrier's wait: PostgreSQL then commits it
		// locally with a warning. The relay must not take that for the
		// standby's confirmation.
		var cancelled bool
		must(t, e.pool.QueryRow(ctx, `SELECT coalesce(bool_or(pg_cancel_backend(pid)), false) FROM pg_stat_activity
			WHERE application_name = 'outbox-relay-test-barrier'`).Scan(&cancelled))
		if !cancelled {
			t.Fatal("found no barrier connection (application_name outbox-relay-test-barrier) waiting to cancel")
		}
		time.Sleep(2 * time.Second)
		if got(ev) {
			t.Fatal("published the event after its wait for the standby was cancelled on the server (a local commit only)")
		}
		select {
		case err := <-done:
			t.Fatalf("the outbox commit returned (%v) with the synchronous standby down", err)
		default:
		}
		// A graceful stop does not wait out the standby (the drain would
		// otherwise last RELAY_SHUTDOWN_TIMEOUT, 20 s here).
		t0 := time.Now()
		rr.stop(t)
		if took := time.Since(t0); took > 10*time.Second {
			t.Errorf("stopping took %s while a barrier waited for the standby", took.Round(time.Millisecond))
		}
		if got(ev) {
			t.Fatal("published the event while stopping, its commit still waiting for the standby")
		}
		rr = e.startWith(nil, nil)
		rr.waitStreaming(t)
		c.run("standby-start")
		must(t, <-done)
		waitFor(t, 30*time.Second, "the event once the standby has its commit", func() bool { return got(ev) })
		waitFor(t, 30*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
		if n := histCount(rr.metrics.StandbyWaitSeconds); n == 0 {
			t.Error("outbox_relay_sync_standby_wait_seconds observed no wait")
		}
		rr.stop(t)
	}
}

// histCount is a histogram's number of observations.
func histCount(h prometheus.Histogram) uint64 {
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		return 0
	}
	return m.GetHistogram().GetSampleCount()
}

// TestPreflightNamesTheBarrierPrivilege: a DBA who revoked EXECUTE on
// pg_logical_emit_message from PUBLIC would leave the barrier unable to
// commit once events come, a stall; the relay refuses to start instead, and
// says what to grant or set.
func TestPreflightNamesTheBarrierPrivilege(t *testing.T) {
	e := newEnv(t)
	// This database's catalog only: the test's own database.
	e.relayRole("nb", `REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC`)
	var err error
	r := e.start(nil)
	select {
	case err = <-r.done:
		r.done <- err
	case <-time.After(20 * time.Second):
		t.Fatal("the relay did not stop on the missing EXECUTE")
	}
	if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), "pg_logical_emit_message") ||
		!strings.Contains(err.Error(), "RELAY_WAIT_FOR_SYNC_STANDBY=false") {
		t.Fatalf("Run returned %v; want ErrMisconfigured naming pg_logical_emit_message and RELAY_WAIT_FOR_SYNC_STANDBY", err)
	}
	// Without the wait the role needs no such privilege.
	r = e.startWith(func(x *Relay) { x.cfg.WaitForSyncStandby = false }, nil)
	r.waitStreaming(t)
	r.stop(t)
}
