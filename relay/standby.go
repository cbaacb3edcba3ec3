package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Waiting for the synchronous standbys (RELAY_WAIT_FOR_SYNC_STANDBY).
//
// On PostgreSQL 15 and 16 a logical walsender sends a commit as soon as the
// primary has flushed it locally. With synchronous replication the
// application's COMMIT is still waiting for the standby then, and the rest
// of the cluster does not see the row yet. If the primary dies now and the
// standby is promoted, the transaction is gone, but the relay may already
// have published its event: a phantom, an event for a row that never
// existed. (PostgreSQL 17's synchronized_standby_slots closes this on the
// server's side, for failover slots only.)
//
// So before it publishes a streamed event, the relay commits a barrier: a
// transactional logical message, with synchronous_commit on, on a
// connection of its own. The barrier's COMMIT returns once the synchronous
// standbys, as synchronous_standby_names counts them, have flushed WAL past
// the barrier, and therefore past every commit the walsender had sent
// before it: the barrier's position covers them all. One barrier covers a
// whole batch, so it costs one round trip and one standby flush per batch,
// the wait every producer's COMMIT already paid. Swept rows need none: a
// snapshot sees a transaction only after its synchronous wait ended.
//
// The barrier is skipped when synchronous_standby_names is empty (checked
// on every barrier, at most once a second when it is), and while commits may
// wait for the relay itself (it is a synchronous standby candidate, or
// RELAY_SYNC_PUBLISH): then the barrier would wait for the relay's own
// flush report, which cannot move while the relay waits.

// barrierRecheck is how long an empty synchronous_standby_names is trusted
// before the next barrier asks again.
const barrierRecheck = time.Second

// barrierSlow is how long a barrier waits before the relay says so (and
// again every barrierSlow).
const barrierSlow = 5 * time.Second

// barrierFirstCheck is how long a barrier waits before the relay looks
// whether the wait is on itself (then every second).
const barrierFirstCheck = 100 * time.Millisecond

// errSyncWaitCanceled: the server cancelled the barrier's wait for the
// standbys (pg_cancel_backend, or a cancel request) and committed locally.
var errSyncWaitCanceled = errors.New("the wait for the synchronous standbys was cancelled on the server (the barrier committed only locally)")

// errBarrierStopped: the relay is stopping while a barrier waits.
var errBarrierStopped = errors.New("stopping while waiting for the synchronous standbys")

// barrierConn is the relay's connection for barriers: statement_timeout 0
// (a DBA's timeout would cancel the wait, and PostgreSQL then commits
// locally with a warning) and synchronous_commit on, whatever the role's
// defaults are. It watches notices for that warning.
type barrierConn struct {
	mu       sync.Mutex
	conn     *pgx.Conn
	canceled bool // a warning said the sync wait was cancelled
}

// syncBarrier commits a barrier and returns its position, or 0 when
// synchronous_standby_names is empty (nothing to wait for).
func (r *Relay) syncBarrier(ctx context.Context) (pglogrepl.LSN, error) {
	b := &r.barrier
	b.mu.Lock()
	defer b.mu.Unlock()
	for attempt := 0; ; attempt++ {
		if b.conn == nil {
			cfg := r.opt.Pool.Config().ConnConfig.Copy()
			cfg.RuntimeParams["statement_timeout"] = "0"
			cfg.RuntimeParams["synchronous_commit"] = "on"
			cfg.RuntimeParams["application_name"] = r.applicationName() + "-barrier"
			cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
				if strings.Contains(n.Message, "wait for synchronous replication") {
					b.canceled = true
				}
			}
			c, err := pgx.ConnectConfig(ctx, cfg)
			if err != nil {
				return 0, classifyPg(fmt.Errorf("connect for the synchronous-standby barrier: %w", err))
			}
			b.conn = c
		}
		b.canceled = false
		var lsn *string
		err := b.conn.QueryRow(ctx, `SELECT CASE WHEN current_setting('synchronous_standby_names') <> ''
			THEN pg_logical_emit_message(true, 'outbox-relay-barrier', '')::text END`).Scan(&lsn)
		if err != nil {
			_ = b.conn.Close(context.Background())
			b.conn = nil
			if attempt == 0 && ctx.Err() == nil && !isPgError(err) {
				continue // an idle connection a server timeout closed: once more on a new one
			}
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "42501" {
				return 0, classifyPg(fmt.Errorf("commit the synchronous-standby barrier (pg_logical_emit_message; "+
					"GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) to the relay's role, "+
					"or set RELAY_WAIT_FOR_SYNC_STANDBY=false and accept phantom events after a failover): %w", err))
			}
			return 0, classifyPg(fmt.Errorf("commit the synchronous-standby barrier: %w", err))
		}
		if b.canceled {
			return 0, databaseFailure(errSyncWaitCanceled)
		}
		if lsn == nil {
			return 0, nil
		}
		return pglogrepl.ParseLSN(*lsn)
	}
}

func isPgError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr)
}

// closeBarrier closes the barrier connection, at the end of Run.
func (r *Relay) closeBarrier() {
	b := &r.barrier
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		_ = b.conn.Close(context.Background())
		b.conn = nil
	}
}

// needsBarrier reports whether it is a streamed event about to be
// published whose commit no barrier has covered yet.
func (s *session) needsBarrier(it *item, now time.Time) bool {
	if !s.r.cfg.WaitForSyncStandby || it.sweep || it.fate == fateSkip || it.ev.Published {
		return false
	}
	if it.pos.lsn < s.barrierPos || now.Before(s.noSyncUntil) {
		return false
	}
	return !s.prompt.Load()
}

// awaitStandbys commits a barrier for it and waits for it, saying so when
// the wait is long. It gives up the barrier, not the event, when commits
// turn out to wait for the relay itself.
func (s *session) awaitStandbys(ctx context.Context, it *item) error {
	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		lsn pglogrepl.LSN
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		lsn, err := s.r.db.syncBarrier(bctx)
		done <- result{lsn, err}
	}()
	// A barrier takes a round trip and a standby's flush. One that takes
	// longer may be waiting for the relay itself, which became a
	// synchronous standby since the last check: look at once, then every
	// second, so that commits never wait on it for long.
	check := time.NewTimer(barrierFirstCheck)
	defer check.Stop()
	nextLog := start.Add(barrierSlow)
	for {
		select {
		case res := <-done:
			s.r.m.StandbyWaitSeconds.Observe(time.Since(start).Seconds())
			if res.err != nil {
				return res.err
			}
			if res.lsn == 0 {
				s.noSyncUntil = time.Now().Add(barrierRecheck)
				return nil
			}
			s.barrierPos = res.lsn
			if waited := time.Since(start); waited >= barrierSlow {
				s.log.Info().Dur("waited", waited).Msg("the synchronous standbys confirmed; publishing again")
			}
			return nil
		case <-check.C:
			check.Reset(time.Second)
			s.checkSyncNow(ctx)
			if s.prompt.Load() {
				s.log.Warn().Msg("commits may wait for the relay itself (it is a synchronous standby candidate): " +
					"publishing without waiting for the synchronous standbys (RELAY_WAIT_FOR_SYNC_STANDBY)")
				cancel()
				<-done
				return nil
			}
			if time.Now().Before(nextLog) {
				continue
			}
			nextLog = nextLog.Add(barrierSlow)
			s.log.Warn().Dur("waited", time.Since(start).Round(time.Second)).Str("commit_lsn", it.pos.lsn.String()).
				Msg("waiting for the synchronous standbys to confirm a commit before publishing its events " +
					"(RELAY_WAIT_FOR_SYNC_STANDBY); the application's COMMIT waits for them too")
		case <-s.halted:
			cancel()
			<-done
			return nil // the caller sees the halt and publishes nothing more
		case <-s.stopping:
			// A graceful stop does not wait for a standby that may be gone
			// for long: what is unpublished is not acknowledged either, and
			// the next relay reads it again.
			cancel()
			<-done
			return errBarrierStopped
		}
	}
}
