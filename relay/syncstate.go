package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// The relay's walsender as a synchronous standby (DESIGN.md, invariant 12).
//
// synchronous_standby_names = '*' (or FIRST 1 (*), or a list naming the
// relay's application_name) matches logical walsenders too, and PostgreSQL
// picks the matching walsender in the lowest slot of its array: a relay that
// connected before the physical standby becomes the synchronous standby, and
// every commit in the cluster waits for the relay's flush reports. The relay
// cannot refuse the role; it detects it, says so, and behaves so that no
// commit waits longer than it must: it answers at once when its done
// position moves (session.promptStatus), and it acknowledges rows it cannot
// mark yet once their broker confirmation is recorded (mark.go, markOrRecord).

// Sync states as pg_stat_replication.sync_state shows them, plus the relay's
// own "unknown": the role may not read sync_state (it needs pg_monitor or
// pg_read_all_stats), but synchronous_standby_names could name the relay.
const (
	syncAsync     = "async"
	syncPotential = "potential"
	syncSync      = "sync"
	syncQuorum    = "quorum"
	syncUnknown   = "unknown"
)

// defaultSyncCheckInterval is how often the relay reads its sync_state
// after the checks at the start of streaming: a single cheap query.
const defaultSyncCheckInterval = 15 * time.Second

// syncCandidate reports whether commits may wait for the relay in state.
func syncCandidate(state string) bool {
	switch state {
	case syncSync, syncQuorum, syncPotential, syncUnknown:
		return true
	}
	return false
}

// syncReading is one look at the relay's walsender.
type syncReading struct {
	state  string // one of the sync* constants
	names  string // synchronous_standby_names
	others string // application_names of the physical standbys, comma-separated
	// otherCandidates counts the other walsenders that are synchronous
	// standby candidates: PostgreSQL picks one of them if the relay leaves.
	otherCandidates int
}

// readSyncState reads the sync_state of the walsender with pid, the
// setting, and the physical standbys the fix should name.
func (r *Relay) readSyncState(ctx context.Context, pid uint32) (syncReading, error) {
	var state *string
	var rd syncReading
	// Physical walsenders are those that stream no logical slot.
	err := r.opt.Pool.QueryRow(ctx, `
		SELECT (SELECT sync_state FROM pg_stat_replication WHERE pid = $1),
			current_setting('synchronous_standby_names'),
			coalesce((SELECT string_agg(DISTINCT p.application_name, ',' ORDER BY p.application_name)
				FROM pg_stat_replication p
				WHERE p.pid <> $1 AND p.application_name <> ''
				AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s
					WHERE s.active_pid = p.pid AND s.slot_type = 'logical')), ''),
			(SELECT count(*) FROM pg_stat_replication p
				WHERE p.pid <> $1 AND p.sync_state IN ('sync', 'quorum', 'potential'))`,
		int64(pid)).Scan(&state, &rd.names, &rd.others, &rd.otherCandidates)
	if err != nil {
		return rd, classifyPg(fmt.Errorf("read pg_stat_replication: %w", err))
	}
	switch {
	case state != nil && *state != "":
		rd.state = *state
	case namesRelay(rd.names, r.applicationName()):
		// No privilege to see sync_state; the setting could match.
		rd.state = syncUnknown
	default:
		rd.state = syncAsync
	}
	return rd, nil
}

// applicationName is the replication connection's application_name.
func (r *Relay) applicationName() string {
	if r.opt.Replication != nil {
		return r.opt.Replication.RuntimeParams["application_name"]
	}
	return ""
}

// namesRelay reports whether a synchronous_standby_names value could match
// a walsender named app: '*' or the name itself, in any of the forms
// (s1, s2), FIRST n (...), ANY n (...), quoted or not.
func namesRelay(setting, app string) bool {
	fields := strings.FieldsFunc(setting, func(r rune) bool {
		return r == ',' || r == '(' || r == ')' || r == ' ' || r == '\t' || r == '\n'
	})
	for _, f := range fields {
		f = strings.Trim(f, `"`)
		if f == "*" || (app != "" && strings.EqualFold(f, app)) {
			return true
		}
	}
	return false
}

// watchSync reads the relay's sync_state when streaming starts, again a
// second later (a walsender becomes eligible only once it has reported a
// flush position), and then every SyncCheckInterval; the marker also checks
// when rows stay invisible (checkSyncNow). Failures are logged
// and retried at the next check: detection never ends a session.
func (s *session) watchSync(st stops) error {
	soft, hard := st.soft, st.hard
	select {
	case <-s.started:
	case <-s.drained:
		return nil
	case <-soft.Done():
		return nil
	case <-hard.Done():
		return nil
	}
	pid := s.conn.PID()
	wait := time.Duration(0)
	for checks := 0; ; checks++ {
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-s.drained:
				t.Stop()
				return nil
			case <-soft.Done():
				t.Stop()
				return nil
			case <-hard.Done():
				t.Stop()
				return nil
			}
		}
		wait = s.r.opt.SyncCheckInterval
		if checks == 0 {
			wait = min(wait, time.Second)
		}
		s.checkSync(hard, pid)
	}
}

// checkSyncNow is a check outside the schedule, from the marker: rows of a
// committed transaction stay invisible, as when the relay has just become
// the synchronous standby.
func (s *session) checkSyncNow(ctx context.Context) {
	select {
	case <-s.started:
		s.checkSync(ctx, s.conn.PID())
	default: // not streaming: the walsender is nobody's standby yet
	}
}

func (s *session) checkSync(ctx context.Context, pid uint32) {
	qctx, cancel := context.WithTimeout(ctx, s.r.cfg.PostgresTimeout)
	rd, err := s.r.db.readSyncState(qctx, pid)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			s.r.m.Retries.WithLabelValues("postgres", "sync_state").Inc()
			s.log.Warn().Err(err).Msg("could not read the relay's sync_state in pg_stat_replication; trying again later")
		}
		return
	}
	s.applySync(rd)
}

// applySync acts on a reading: prompt replies while commits may wait for
// the relay, the metric, /readyz, and a log line when the state changes.
func (s *session) applySync(rd syncReading) {
	s.syncMu.Lock() // the watcher and the marker
	defer s.syncMu.Unlock()
	r := s.r
	candidate := syncCandidate(rd.state)
	s.prompt.Store(candidate || r.cfg.SyncPublish)
	// Step aside only where commits do wait for the relay (not while it is
	// merely potential) and someone else can take the role. A role without
	// pg_monitor sees no sync_state at all (unknown): there, a physical
	// standby it can see by name is taken as one that can, rather than let
	// a stalled broker hold every commit; at worst the relay leaves for a
	// while when it need not have, delaying events, never losing them.
	waitedOn := rd.state == syncSync || rd.state == syncQuorum
	someoneElse := rd.otherCandidates > 0
	if rd.state == syncUnknown && rd.others != "" {
		waitedOn, someoneElse = true, true
	}
	s.mayStepAside.Store(waitedOn && !r.cfg.SyncPublish && someoneElse)
	r.m.SetSyncStandby(rd.state, candidate, r.cfg.SyncPublish)
	notice := ""
	switch {
	case candidate && r.cfg.SyncPublish:
		notice = fmt.Sprintf("synchronous standby (sync_state %s), on purpose (RELAY_SYNC_PUBLISH): commits wait for the broker's confirms", rd.state)
	case candidate:
		notice = fmt.Sprintf("warning: this relay's walsender is a synchronous standby candidate (sync_state %s, "+
			"synchronous_standby_names = %q): commits can wait for the relay; %s", rd.state, rd.names, syncFix(rd))
	case r.cfg.SyncPublish:
		notice = "RELAY_SYNC_PUBLISH is set but the relay is not a synchronous standby: commits do not wait for the broker"
	}
	r.m.SetNotice(notice)
	if rd.state == r.syncLogged {
		return
	}
	prev := r.syncLogged
	r.syncLogged = rd.state
	log := s.log.With().Str("sync_state", rd.state).Str("synchronous_standby_names", rd.names).Logger()
	switch {
	case candidate && r.cfg.SyncPublish:
		log.Info().Msg("the relay is a synchronous standby (RELAY_SYNC_PUBLISH): a commit returns once the broker confirmed its events")
	case candidate && rd.state == syncUnknown:
		log.Warn().Msg("synchronous_standby_names may match the relay's walsender and the relay cannot read its sync_state " +
			"(grant pg_monitor to see it); answering the server at once. " + syncFix(rd))
	case candidate:
		log.Warn().Msg("the relay's walsender is a synchronous standby candidate: commits in the whole cluster can wait for the relay; " +
			"the relay answers at once and records confirmed events it cannot mark yet, so nothing hangs, but every commit pays for it. " +
			syncFix(rd))
	case r.cfg.SyncPublish:
		log.Warn().Msg("RELAY_SYNC_PUBLISH is set but the relay is not a synchronous standby: commits do not wait for the broker " +
			"(list the relay's application_name in synchronous_standby_names)")
	case prev != "" && syncCandidate(prev):
		log.Info().Msg("the relay's walsender is no longer a synchronous standby candidate")
	}
}

// syncFix says how to keep the relay out of synchronous replication.
func syncFix(rd syncReading) string {
	example := "FIRST 1 (walreceiver_name)"
	if rd.others != "" {
		example = "FIRST 1 (" + rd.others + ")"
	}
	return fmt.Sprintf("Fix: name the physical standbys in synchronous_standby_names instead of '*', e.g. '%s' "+
		"(a standby's name is application_name in its primary_conninfo), or set RELAY_SYNC_PUBLISH=true if this is meant", example)
}

// errStepAside ends a session in which the relay, an unintended synchronous
// standby, could not finish any event for syncStallLimit: every commit in
// the cluster was waiting for it (typically for the broker's confirms).
var errStepAside = errors.New("stepping aside as synchronous standby")

// checkStall is the step-aside guard (invariant 12). While the relay is a
// synchronous standby nobody asked for (sync_state sync or quorum, not
// RELAY_SYNC_PUBLISH) and another walsender could take the role, a relay that finishes no event for
// SyncStallLimit with work in flight ends its session: its walsender
// leaves, PostgreSQL picks the other candidate, and commits go on. Run waits
// SyncHoldOff before connecting again, since the relay would take the
// lowest walsender slot, and the role, again. Nothing is acknowledged early:
// the unfinished events are replayed. Progress is counted in events, not
// in the done position, so one very large transaction never trips it.
func (s *session) checkStall(now time.Time) error {
	if !s.mayStepAside.Load() {
		s.stuckSince = time.Time{}
		return nil
	}
	n := s.finished.Load()
	if n != s.stallSeen || s.tracker.InFlight() == 0 {
		s.stallSeen, s.stuckSince = n, time.Time{}
		return nil
	}
	if s.stuckSince.IsZero() {
		s.stuckSince = now
		return nil
	}
	if stuck := now.Sub(s.stuckSince); stuck >= s.r.opt.SyncStallLimit {
		return fmt.Errorf("%w: no event finished for %s while every commit waited for the relay "+
			"(the broker is not confirming, or marks are stuck); another standby takes the role for %s",
			errStepAside, stuck.Round(100*time.Millisecond), s.r.opt.SyncHoldOff)
	}
	return nil
}
