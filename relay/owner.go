package relay

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
)

// ownerLockClass is the first key of the relays' advisory locks; the second
// is hashtext of the slot name. Advisory locks are per database, like the
// relay's slot (preflight refuses a slot of another database).
const ownerLockClass = 7340212

// ownerApplicationName names the lock's session in pg_stat_activity; its
// lock is in pg_locks (locktype advisory, classid 7340212).
const ownerApplicationName = "outbox-relay slot owner"

// owner is a relay's claim on its slot (invariant 10): a session-level
// advisory lock, held on a connection of its own for as long as the
// session lives, taken before the slot is looked at. The slot's own
// `active` flag cannot serve: PostgreSQL releases a slot right after
// CREATE_REPLICATION_SLOT, so during the table sweep that follows, a
// standby would see an inactive slot with its sweep pending, drop it and
// sweep again, and the owner would go on streaming from the standby's slot.
//
// A relay that dies releases the lock with its connection; one that hangs
// keeps it, and its standbys keep waiting, as they must.
type owner struct {
	conn   *pgx.Conn
	lost   chan struct{} // closed when the lock's connection ends
	cancel context.CancelFunc
}

// claim takes the slot's lock, or returns errStandby when another relay
// holds it.
func (r *Relay) claim(ctx context.Context) (ownership, error) {
	cfg := r.opt.Pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = ownerApplicationName
	// Ending the wait below is the release: close the socket at once rather
	// than send a cancel request an idle backend ignores and wait a second.
	cfg.BuildContextWatcherHandler = func(pg *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.DeadlineContextWatcherHandler{Conn: pg.Conn()}
	}
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(qctx, cfg)
	if err != nil {
		return nil, classifyPg(fmt.Errorf("connect for the slot's ownership lock: %w", err))
	}
	var got bool
	err = conn.QueryRow(qctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, ownerLockClass, r.cfg.Slot).Scan(&got)
	if err != nil || !got {
		_ = conn.Close(context.Background())
		if err != nil {
			return nil, classifyPg(fmt.Errorf("take the slot's ownership lock: %w", err))
		}
		return nil, errStandby
	}
	wctx, wcancel := context.WithCancel(context.Background())
	o := &owner{conn: conn, lost: make(chan struct{}), cancel: wcancel}
	go func() {
		// Nothing is ever sent on this connection again: the wait returns
		// only when the connection ends (terminated, or the server gone).
		_ = conn.PgConn().WaitForNotification(wctx)
		close(o.lost)
	}()
	return o, nil
}

// Lost is closed when the lock may no longer be held.
func (o *owner) Lost() <-chan struct{} { return o.lost }

// release gives the slot up: closing the connection ends the lock.
func (o *owner) release() {
	o.cancel()
	<-o.lost
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = o.conn.Close(ctx)
}
