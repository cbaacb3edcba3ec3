package relay

// RELAY_ON_PUBLISHED=delete against real PostgreSQL and RabbitMQ: the same
// guarantees as the mark (each event once, in order, on the sweep and on
// the stream; a replay skips what was published), with the row deleted
// instead of marked, and only once the broker confirmed it.

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/sink"
)

func newDeleteEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	e.cfg.OnPublished = config.OnPublishedDelete
	return e
}

// rows counts the table's rows, published or not.
func (e *env) rows() int {
	e.t.Helper()
	var n int
	must(e.t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_events`).Scan(&n))
	return n
}

func idsOf(evs []event) []string {
	ids := make([]string, len(evs))
	for i, ev := range evs {
		ids[i] = ev.ID
	}
	return ids
}

// TestDeleteModeSweepsStreamsAndDeletes: rows written before the slot are
// swept, then the stream's, each exactly once and in order; every row is
// deleted and none is marked. A row marked before the switch from mark mode
// is neither published nor deleted.
func TestDeleteModeSweepsStreamsAndDeletes(t *testing.T) {
	e := newDeleteEnv(t)
	ctx := context.Background()
	var want []event
	for range 600 {
		want = append(want, newEvent("legacy", "imported", `{"old":true}`))
	}
	e.insertTx(want, true, nil)
	history := newEvent("legacy", "done", `{}`)
	e.insertTx([]event{history}, true, nil)
	_, err := e.pool.Exec(ctx, `UPDATE outbox_events SET published_at = now() WHERE id = $1`, history.ID)
	must(t, err)

	r := e.start(nil)
	r.waitStreaming(t)
	for i := range 20 {
		var tx []event
		for range 1 + i%5 {
			tx = append(tx, newEvent("order", "created", `{"n":1}`))
		}
		e.insertTx(tx, true, nil)
		want = append(want, tx...)
	}
	e.waitReceived(len(want), 30*time.Second)
	end := e.currentLSN()
	waitFor(t, 10*time.Second, "the slot past the last event", func() bool { return e.slotPast(end) })
	e.checkReceivedInOrder(idsOf(want))
	waitFor(t, 20*time.Second, "every published row deleted", func() bool { return e.rows() == 1 })
	var left string
	must(t, e.pool.QueryRow(ctx, `SELECT id::text FROM outbox_events`).Scan(&left))
	if left != history.ID {
		t.Fatalf("the row left is %s, want the one marked before the switch (%s)", left, history.ID)
	}
	if got := value(r.metrics.EventsPublished); got != float64(len(want)) {
		t.Fatalf("events published metric %v, want %d", got, len(want))
	}
	r.stop(t)
}

// TestDeleteModeReplaySkipsDeletedRows: the previous relay published and
// deleted 30 rows but crashed before it acknowledged them, so the slot
// delivers them again. Their transactions are visible and their rows are
// gone, and they committed before the slot's deleted_through: the replay
// publishes none of them. With the mark's replay check a missing row counts
// as "deleted by the application, unknown whether published" and all would
// be published. Five rows the application deleted after deleted_through,
// before any relay published them, are published: skipping every missing
// row lost all events of a table whose producers delete their rows.
func TestDeleteModeReplaySkipsDeletedRows(t *testing.T) {
	e := newDeleteEnv(t)
	ctx := context.Background()
	_, err := e.pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, e.cfg.Slot)
	must(t, err)
	var done, fresh, cancelled []event
	for range 30 {
		done = append(done, newEvent("order", "created", `{}`))
	}
	for range 10 {
		fresh = append(fresh, newEvent("order", "paid", `{}`))
	}
	for range 5 {
		cancelled = append(cancelled, newEvent("order", "cancelled", `{}`))
	}
	e.insertTx(done[:15], true, nil)
	e.insertTx(done[15:], true, nil)
	// The previous relay deleted these and recorded their position.
	_, err = e.pool.Exec(ctx, `DELETE FROM outbox_events WHERE event_type = 'created'`)
	must(t, err)
	_, err = e.pool.Exec(ctx, `INSERT INTO outbox_relay_slot_state (slot_name, sweep_pending, deleted_through)
		VALUES ($1, false, pg_current_wal_lsn())`, e.cfg.Slot)
	must(t, err)
	e.insertTx(fresh, true, nil)
	// The application deletes these before any relay published them: past
	// deleted_through, so they are published (the stream has them).
	e.insertTx(cancelled, true, nil)
	_, err = e.pool.Exec(ctx, `DELETE FROM outbox_events WHERE event_type = 'cancelled'`)
	must(t, err)
	end := e.currentLSN()

	r := e.start(nil)
	waitFor(t, 20*time.Second, "the slot past the replay", func() bool { return e.slotPast(end) })
	// Not the 30 done, each of the others once, in order.
	e.checkReceivedInOrder(append(idsOf(fresh), idsOf(cancelled)...))
	waitFor(t, 10*time.Second, "the fresh rows deleted", func() bool { return e.rows() == 0 })
	r.stop(t)
}

// TestDeleteModeDeletesOnlyConfirmedRows: while the broker confirms
// nothing, no row is deleted however long the relay holds them, and once it
// confirms every row goes. A crash (the relay stopped while confirms are
// held) deletes nothing, and the next relay publishes every row.
func TestDeleteModeDeletesOnlyConfirmedRows(t *testing.T) {
	e := newDeleteEnv(t)
	e.cfg.ShutdownTimeout = 2 * time.Second // the held confirms never come
	var evs []event
	for range 50 {
		evs = append(evs, newEvent("order", "created", `{}`))
	}
	hold := make(chan struct{})
	held := e.start(func(p sink.Publisher) sink.Publisher { return &holdingPublisher{Publisher: p, hold: hold} })
	held.waitStreaming(t)
	e.insertTx(evs, true, nil)
	e.waitReceived(len(evs), 20*time.Second) // published, not confirmed
	time.Sleep(time.Second)
	if all := e.rows(); all != len(evs) {
		t.Fatalf("%d of %d rows left while the broker confirmed nothing: rows deleted before their confirm", all, len(evs))
	}
	held.cancel() // the relay goes, its confirms never came
	<-held.done
	held.done <- nil
	if all := e.rows(); all != len(evs) {
		t.Fatalf("%d of %d rows left after the relay stopped unconfirmed", all, len(evs))
	}

	r := e.start(nil)
	e.waitReceived(2*len(evs), 20*time.Second)
	waitFor(t, 20*time.Second, "every row deleted", func() bool { return e.rows() == 0 })
	close(hold)
	r.stop(t)
}

// TestPreflightNamesTheMissingWritePrivilege: a role that may mark but not
// delete is refused in delete mode before anything is published, and the
// error names the privilege, the table and the GRANT; one that may not
// mark is refused in mark mode.
func TestPreflightNamesTheMissingWritePrivilege(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	role := e.relayRole("lp")
	e.insertTx([]event{newEvent("order", "created", `{}`)}, true, nil)

	for _, c := range []struct {
		mode, revoke, want string
	}{
		{config.OnPublishedDelete, "", "RELAY_ON_PUBLISHED=delete needs DELETE on public.outbox_events"},
		{config.OnPublishedMark, `REVOKE UPDATE (published_at) ON outbox_events FROM ` + role,
			"RELAY_ON_PUBLISHED=mark needs UPDATE (published_at) on public.outbox_events"},
	} {
		if c.revoke != "" {
			_, err := e.pool.Exec(ctx, c.revoke)
			must(t, err)
		}
		e.cfg.OnPublished = c.mode
		r := e.start(nil)
		var err error
		select {
		case err = <-r.done:
			r.done <- err
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: the relay did not stop on a missing privilege", c.mode)
		}
		if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), c.want) ||
			!strings.Contains(err.Error(), "GRANT") || !strings.Contains(err.Error(), role) {
			t.Fatalf("%s: Run returned %v; want ErrMisconfigured naming %q, the role and the GRANT", c.mode, err, c.want)
		}
		if n := e.receivedCount(); n != 0 {
			t.Fatalf("%s: %d events published by a relay that cannot record them", c.mode, n)
		}
	}
}

// relayRole creates a LOGIN REPLICATION role (named after prefix) with
// the mark-mode grants of deploy/least-privilege.sql, runs the statements
// of more (as the admin), and makes the relays the test starts from now on
// connect as that role. It is dropped when the test ends.
func (e *env) relayRole(prefix string, more ...string) string {
	t := e.t
	t.Helper()
	ctx := context.Background()
	role := testenv.Name(t, prefix)
	_, err := e.pool.Exec(ctx, `CREATE ROLE `+role+` LOGIN REPLICATION`)
	must(t, err)
	t.Cleanup(func() {
		_, _ = e.pool.Exec(context.Background(), `DROP OWNED BY `+role)
		_, _ = e.pool.Exec(context.Background(), `DROP ROLE `+role)
	})
	for _, q := range append([]string{
		`GRANT SELECT, UPDATE (published_at) ON outbox_events TO ` + role,
		`GRANT SELECT, INSERT, UPDATE ON outbox_relay_slot_state TO ` + role,
		`GRANT SELECT, INSERT, DELETE ON outbox_relay_confirmed TO ` + role,
	}, more...) {
		_, err := e.pool.Exec(ctx, q)
		must(t, err)
	}
	e.dbURL = strings.Replace(e.dbURL, "postgres@", role+"@", 1)
	if !strings.Contains(e.dbURL, role+"@") {
		t.Fatalf("cannot put role %s into the test URL", role)
	}
	return role
}

// holdingPublisher publishes for real; the confirms wait until hold is
// closed (or the session ends).
type holdingPublisher struct {
	sink.Publisher
	hold chan struct{}
}

func (p *holdingPublisher) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	pe, err := p.Publisher.Publish(ctx, m)
	if err != nil {
		return nil, err
	}
	return holdingPending{pe, p.hold}, nil
}

type holdingPending struct {
	sink.Pending
	hold chan struct{}
}

func (p holdingPending) Wait(ctx context.Context) (sink.Result, error) {
	select {
	case <-p.hold:
	case <-ctx.Done():
		return sink.Result{}, ctx.Err()
	}
	return p.Pending.Wait(ctx)
}
