package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgerrcode"
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

// barrier is a session's connection for barriers (openBarrier).
type barrier interface {
	// commit commits one barrier and returns its position, or 0 when
	// synchronous_standby_names is empty (nothing to wait for).
	commit(ctx context.Context) (pglogrepl.LSN, error)
	close()
}

// pgBarrier is the real one: statement_timeout 0 (a DBA's timeout would
// cancel the wait, and PostgreSQL then commits locally with a warning),
// synchronous_commit on whatever the role's default is, and warnings sent
// to the client (client_min_messages), so that such a cancellation is seen.
//
// It belongs to one session and is opened with the replication connection,
// before the stream starts, and never opened again within the session: a
// barrier connection that reconnected on its own could reach a promoted
// standby while the stream still delivers the dead primary's commits, and
// that server's answer would say nothing about them.
type pgBarrier struct {
	conn   *pgx.Conn
	warned atomic.Bool // a WARNING arrived during the barrier
}

// openBarrier connects the session's barrier connection, to the primary.
func (r *Relay) openBarrier(ctx context.Context) (barrier, error) {
	b := &pgBarrier{}
	cfg := r.opt.Pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["statement_timeout"] = "0"
	cfg.RuntimeParams["synchronous_commit"] = "on"
	cfg.RuntimeParams["client_min_messages"] = "warning"
	cfg.RuntimeParams["application_name"] = r.applicationName() + "-barrier"
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		// The only warning a commit of a logical message gives is the
		// cancelled wait for the standbys ("canceling wait for synchronous
		// replication …"), in whatever language lc_messages says.
		if n.SeverityUnlocalized == "WARNING" || (n.SeverityUnlocalized == "" && n.Severity == "WARNING") ||
			strings.Contains(n.Message, "wait for synchronous replication") {
			b.warned.Store(true)
		}
	}
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	c, err := pgx.ConnectConfig(qctx, cfg)
	if err != nil {
		return nil, classifyPg(fmt.Errorf("connect for the synchronous-standby barrier (RELAY_WAIT_FOR_SYNC_STANDBY): %w", err))
	}
	var standby bool
	if err := c.QueryRow(qctx, `SELECT pg_is_in_recovery()`).Scan(&standby); err != nil || standby {
		_ = c.Close(context.Background())
		if err == nil {
			err = errors.New("the server is a standby (give RELAY_DATABASE_URL target_session_attrs=read-write)")
		}
		return nil, classifyPg(fmt.Errorf("connect for the synchronous-standby barrier: %w", err))
	}
	b.conn = c
	return b, nil
}

func (b *pgBarrier) commit(ctx context.Context) (pglogrepl.LSN, error) {
	b.warned.Store(false)
	var lsn *string
	err := b.conn.QueryRow(ctx, `SELECT CASE WHEN current_setting('synchronous_standby_names') <> ''
		THEN pg_logical_emit_message(true, 'outbox-relay-barrier', '')::text END`).Scan(&lsn)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == pgerrcode.InsufficientPrivilege {
			return 0, classifyPg(fmt.Errorf("commit the synchronous-standby barrier (%s): %w", barrierGrant, err))
		}
		return 0, classifyPg(fmt.Errorf("commit the synchronous-standby barrier: %w", err))
	}
	if b.warned.Load() {
		return 0, databaseFailure(errSyncWaitCanceled)
	}
	if lsn == nil {
		return 0, nil
	}
	return pglogrepl.ParseLSN(*lsn)
}

func (b *pgBarrier) close() { _ = b.conn.Close(context.Background()) }

// barrierGrant is what to do when the role may not write the barrier.
const barrierGrant = "the relay's role needs EXECUTE on pg_logical_emit_message(boolean, text, text): " +
	"GRANT it, or set RELAY_WAIT_FOR_SYNC_STANDBY=false and accept phantom events after a failover"

// checkBarrierPrivilege runs before the first stream, so that a role
// without the privilege stops the relay with the fix, rather than stalling
// it once events come.
func (r *Relay) checkBarrierPrivilege(ctx context.Context) error {
	if !r.cfg.WaitForSyncStandby {
		return nil
	}
	var ok bool
	err := r.opt.Pool.QueryRow(ctx,
		`SELECT has_function_privilege('pg_catalog.pg_logical_emit_message(boolean, text, text)', 'EXECUTE')`).Scan(&ok)
	if err != nil {
		return classifyPg(fmt.Errorf("check EXECUTE on pg_logical_emit_message: %w", err))
	}
	if !ok {
		return fmt.Errorf("%w: %s", ErrMisconfigured, barrierGrant)
	}
	return nil
}

// needsBarrier reports whether it is a streamed event about to be
// published whose commit no barrier has covered yet. Only the first event
// of a transaction asks: once one of its events is published, holding the
// rest would protect nothing, and a stop would cut the transaction short.
func (s *session) needsBarrier(it *item, now time.Time) bool {
	if s.barrier == nil || it.sweep {
		return false
	}
	first := it.pos.lsn != s.lastTxLSN
	s.lastTxLSN = it.pos.lsn
	if !first || it.fate == fateSkip || it.ev.Published {
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
		lsn, err := s.barrier.commit(bctx)
		done <- result{lsn, err}
	}()
	// A barrier takes a round trip and a standby's flush. One that takes
	// longer may be waiting for the relay itself, which became a
	// synchronous standby since the last check: look at once, then every
	// second, so that commits never wait on it for long.
	check := time.NewTimer(barrierFirstCheck)
	defer check.Stop()
	nextLog := start.Add(barrierSlow)
	// A stop gives up only a barrier that is slow already: a healthy one
	// takes milliseconds, and its events drain with the rest.
	var stopping <-chan struct{}
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
			stopping = s.stopping
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
		case <-stopping:
			// A graceful stop does not wait for a standby that may be gone
			// for long: what is unpublished is not acknowledged either, and
			// the next relay reads it again. The barrier guards the first
			// event of a transaction, so none of it is published yet.
			cancel()
			<-done
			return errBarrierStopped
		}
	}
}
