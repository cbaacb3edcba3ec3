package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// mark sets published_at for confirmed events in batches and only then
// finishes them in the tracker.
func (s *session) mark(ctx context.Context) error {
	defer close(s.drained)
	if err := s.startRecorded(ctx); err != nil {
		if ctx.Err() == nil {
			return s.carryRest(ctx, nil, err)
		}
		return err
	}
	max := s.r.cfg.MarkBatchSize
	batch := make([]*item, 0, max)
	for {
		it, ok, err := s.nextConfirmed(ctx)
		if err != nil && ctx.Err() == nil {
			return s.carryRest(ctx, nil, err)
		}
		if err != nil || !ok {
			return err
		}
		batch = append(batch[:0], it)
		// Wait up to RELAY_MARK_DELAY for more: one UPDATE (and one commit
		// flush) for many events. It delays the acknowledgement, never the
		// delivery, and it takes the database's fsyncs away from the
		// producers' commits. Not while commits may wait for the relay
		// (a synchronous standby): there it would delay every commit.
		linger := s.r.cfg.MarkDelay
		if s.prompt.Load() {
			linger = 0
		}
		var timeout <-chan time.Time
		var timer *time.Timer
		if linger > 0 {
			timer = time.NewTimer(linger)
			timeout = timer.C
		}
	gather:
		for len(batch) < max {
			select {
			case it, ok := <-s.confirmed:
				if !ok {
					break gather
				}
				batch = append(batch, it)
				continue
			default:
			}
			if timeout == nil {
				break
			}
			select {
			case it, ok := <-s.confirmed:
				if !ok {
					break gather
				}
				batch = append(batch, it)
			case <-timeout:
				break gather
			case <-ctx.Done():
				timer.Stop()
				s.unmarked = batch // confirmed: carried over, not published again
				return ctx.Err()
			}
		}
		if timer != nil {
			timer.Stop()
		}
		if err := s.markBatch(ctx, batch); err != nil {
			return s.carryRest(ctx, batch, err)
		}
		// Completing recorded events is off the commits' path: do it when
		// no confirmed event waits, or at least every completeAtLeast.
		if len(s.confirmed) == 0 || time.Since(s.lastComplete) >= completeAtLeast {
			if err := s.completeRecorded(ctx, false); err != nil {
				return s.carryRest(ctx, nil, err)
			}
		}
	}
}

// carryRest ends the marker after a failure on the database's side (a
// connection cut, a timeout) while the broker may be fine: the session
// halts, and the events still in flight are confirmed and carried to the
// next session with the batch that failed, instead of being abandoned and
// published again. It returns when the confirmer has stopped.
func (s *session) carryRest(ctx context.Context, batch []*item, err error) error {
	s.halt(err)
	for {
		it, ok, rerr := recv(ctx, s.confirmed)
		if rerr != nil || !ok {
			break
		}
		batch = append(batch, it)
	}
	s.unmarked = batch // carried over once the session has stopped
	return err
}

// nextConfirmed is recv on the confirmed channel; while recorded events
// wait to be marked it also completes them now and then.
func (s *session) nextConfirmed(ctx context.Context) (*item, bool, error) {
	for s.records > 0 {
		t := time.NewTimer(s.completeWait)
		select {
		case it, ok := <-s.confirmed:
			t.Stop()
			return it, ok, nil
		case <-ctx.Done():
			t.Stop()
			return nil, false, ctx.Err()
		case <-t.C:
		}
		if err := s.completeRecorded(ctx, true); err != nil {
			return nil, false, err
		}
		// A commit that waits for someone else (a physical synchronous
		// standby that is down) can keep rows invisible for long: poll
		// less often the longer it lasts.
		s.completeWait = min(2*s.completeWait, time.Second)
	}
	return recv(ctx, s.confirmed)
}

func (s *session) markBatch(ctx context.Context, batch []*item) error {
	ids := make([]string, 0, len(batch))
	var through streamPos // the batch's last event in the stream (delete mode's deleted_through)
	for _, it := range batch {
		if it.pos.after(through) {
			through = it.pos
		}
		if it.fate != fateSkip {
			ids = append(ids, it.ev.ID)
		}
	}
	bo := s.r.newBackoff(time.Millisecond, 500*time.Millisecond)
	started := time.Now()
	warned, checked := false, false
	for attempt := 0; len(ids) > 0; attempt++ {
		t0 := time.Now()
		var marked []string
		var err error
		if s.prompt.Load() {
			// Commits may wait for the relay: their rows are invisible
			// until it acknowledges. Mark and record in one round trip.
			marked, err = s.markOrRecord(ctx, ids, batch, through)
		} else {
			marked, err = s.r.db.markRows(ctx, ids, through)
		}
		if err != nil {
			return err
		}
		s.r.m.MarkSeconds.Observe(time.Since(t0).Seconds())
		ids = remove(ids, marked)
		if len(ids) == 0 {
			break
		}
		// Rows the UPDATE did not reach are already marked (a replay, or
		// the table sweep), not yet visible (invariant 5: the walsender can
		// send a commit before it is visible), or deleted.
		already, err := s.r.db.publishedRows(ctx, ids)
		if err != nil {
			return err
		}
		ids = remove(ids, already)
		if len(ids) == 0 {
			break
		}
		if !checked && time.Since(started) > time.Second && s.conn != nil {
			// Rows invisible for this long: the relay may have become a
			// synchronous standby since its last check. Check now rather
			// than at the next periodic check (up to 15s away).
			checked = true
			s.checkSyncNow(ctx)
		}
		if attempt >= 3 {
			gone, err := s.deletedRows(ctx, ids, batch)
			if err != nil {
				return err
			}
			s.noteDeleted(gone)
			ids = remove(ids, gone)
			if len(ids) == 0 {
				break
			}
		}
		s.r.m.Retries.WithLabelValues("postgres", "mark_not_visible").Inc()
		if !warned && time.Since(started) > 5*time.Second {
			warned = true
			s.log.Warn().Int("rows", len(ids)).Str("first", ids[0]).
				Msg("rows still not visible to the mark; retrying (acknowledgement waits)")
		}
		if !sleep(ctx, bo.next()) {
			return ctx.Err()
		}
	}
	m := s.r.m
	for _, it := range batch {
		switch it.fate {
		case fateSkip:
			m.EventsSkipped.Inc()
		case fatePublish, fateCarried:
			m.EventsPublished.Inc()
		}
		s.tracker.Finish(it.tx, 1)
	}
	s.finished.Add(uint64(len(batch)))
	if s.prompt.Load() {
		s.notifyDone()
	}
	return nil
}

// widenXid is the SQL for the 64-bit xid8 of a 32-bit xid (the $n given)
// within 2^31 of cur.xmax, the xmax of the current snapshot: xmax plus the
// signed 32-bit distance from it. A transaction still in progress can have
// an xid above xmax (xmax is one past the latest completed xid), one from
// before the last wraparound is numerically far above it.
func widenXid(param string) string {
	return `(cur.xmax + ((((` + param + ` - (cur.xmax & 4294967295)) % 4294967296) + 6442450944) % 4294967296) - 2147483648)::text::xid8`
}

// markOrRecord marks the rows of ids that are visible, and records the
// broker's confirmation of stream events whose rows are not visible yet,
// in one statement and one local commit. It returns the ids done either
// way.
//
// Every event the stream delivers is committed: the walsender decodes only
// WAL flushed to disk, commit record included. Its rows can still be
// invisible to other sessions: a commit waiting for a synchronous standby
// stays in the proc array, and pg_xact_status reports it 'in progress'
// (measured on PostgreSQL 15) although the transaction is committed in the
// WAL. When the relay itself is that standby, the rows become visible only
// after the relay acknowledges their LSN. The record stands in for the mark
// until completeRecorded sets published_at (DESIGN.md, invariant 1's
// exception): the replay filter and the table sweep treat a recorded id as
// published, so the acknowledgement can go out before the mark. The marker
// records only while commits may wait for the relay (session.prompt);
// otherwise invisible rows are the short race of invariant 5, and it waits.
func (s *session) markOrRecord(ctx context.Context, ids []string, batch []*item, through streamPos) ([]string, error) {
	want := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		want[id] = struct{}{}
	}
	rid := make([]string, 0, len(ids))
	xids := make([]int64, 0, len(ids))
	for _, it := range batch {
		if _, ok := want[it.ev.ID]; ok && it.xid != 0 && !it.sweep {
			rid = append(rid, it.ev.ID)
			xids = append(xids, int64(it.xid))
			delete(want, it.ev.ID)
		}
	}
	done, recorded, err := s.r.db.markOrRecord(ctx, ids, rid, xids, through)
	if err != nil {
		return nil, err
	}
	if recorded > 0 {
		s.records += recorded
		s.completeWait = completeEvery
		s.r.m.EventsRecorded.Add(float64(recorded))
	}
	return done, nil
}

// markOrRecord is the marker's statement while commits may wait for the
// relay. One snapshot: a row is marked if visible, and recorded only if its
// transaction is not; a row that becomes visible after the statement is
// marked by completeRecorded.
//
// In delete mode it moves deleted_through to through, as markRows does:
// a recorded event is confirmed too.
func (r *Relay) markOrRecord(ctx context.Context, ids, recIDs []string, xids []int64, through streamPos) ([]string, int, error) {
	dt := ""
	args := []any{r.cfg.Slot, ids, recIDs, xids}
	if r.deleting() && through.lsn != 0 {
		dt = r.deletedThroughCTE("$1", "$5", "$6") + ",\n"
		args = append(args, through.lsn.String(), through.event)
	}
	q := `WITH ` + dt + `cur AS (SELECT pg_current_snapshot() AS snap,
			pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax),
		marked AS (` + r.markSQL("$2") + `),
		x AS (SELECT u.id, ` + widenXid("u.xid") + ` AS xid, cur.snap
			FROM unnest($3::uuid[], $4::bigint[]) AS u(id, xid), cur),
		rec AS (INSERT INTO ` + r.stateTable(confirmedTable) + ` (slot_name, id, xid)
			SELECT $1, x.id, x.xid FROM x WHERE NOT pg_visible_in_snapshot(x.xid, x.snap)
			ON CONFLICT (slot_name, id) DO NOTHING RETURNING id)
		SELECT id::text, false FROM marked UNION ALL SELECT id::text, true FROM rec`
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	rows, err := r.opt.Pool.Query(qctx, q, args...)
	if err != nil {
		return nil, 0, classifyPg(fmt.Errorf("mark rows published or record them (outbox_relay_confirmed): %w", err))
	}
	defer rows.Close()
	done := make([]string, 0, len(ids))
	recorded := 0
	for rows.Next() {
		var id string
		var rec bool
		if err := rows.Scan(&id, &rec); err != nil {
			return nil, 0, classifyPg(fmt.Errorf("mark rows published or record them: %w", err))
		}
		done = append(done, id)
		if rec {
			recorded++
		}
	}
	if err := rows.Err(); err != nil {
		return nil, 0, classifyPg(fmt.Errorf("mark rows published or record them: %w", err))
	}
	return done, recorded, nil
}

// completeEvery is how often recorded events are completed while events
// flow, and the first wait when they do not.
const completeEvery = 20 * time.Millisecond

// completeAtLeast bounds how long recorded events wait for their mark
// while confirmed events keep the marker busy.
const completeAtLeast = 200 * time.Millisecond

// startRecorded counts the events an earlier session recorded and not yet
// marked, and completes those that can be.
func (s *session) startRecorded(ctx context.Context) error {
	n, err := s.r.db.countRecorded(ctx)
	if err != nil {
		return err
	}
	s.records = n
	s.completeWait = completeEvery
	if n == 0 {
		return nil
	}
	s.log.Info().Int("events", n).Msg("marking events an earlier session recorded as confirmed before their rows were visible")
	return s.completeRecorded(ctx, true)
}

// completeRecorded marks the recorded events whose rows are visible now and
// deletes their records, in one statement: at every moment an id is either
// recorded or marked. Records of rows known gone (their transaction is
// visible, their row is not there: deleted) are deleted too. Unless force,
// it runs at most every completeEvery.
func (s *session) completeRecorded(ctx context.Context, force bool) error {
	if s.records == 0 || (!force && time.Since(s.lastComplete) < completeEvery) {
		return nil
	}
	s.lastComplete = time.Now()
	t0 := time.Now()
	n, gone, err := s.r.db.completeRecorded(ctx)
	if err != nil {
		return err
	}
	s.r.m.MarkSeconds.Observe(time.Since(t0).Seconds())
	s.noteDeleted(gone)
	s.records = max(0, s.records-n)
	return nil
}

// countRecorded counts this slot's records in outbox_relay_confirmed.
func (r *Relay) countRecorded(ctx context.Context) (int, error) {
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	var n int
	err := r.opt.Pool.QueryRow(qctx, `SELECT count(*) FROM `+r.stateTable(confirmedTable)+` WHERE slot_name = $1`, r.cfg.Slot).Scan(&n)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == pgerrcode.UndefinedTable {
		return 0, fmt.Errorf("%w: table outbox_relay_confirmed does not exist: run `outbox-relay migrate` (migration 005): %w",
			ErrMisconfigured, err)
	}
	if err != nil {
		return 0, classifyPg(fmt.Errorf("read outbox_relay_confirmed: %w", err))
	}
	return n, nil
}

// completeRecorded marks the recorded rows now visible and deletes their
// records, in one statement: at every moment an id is either recorded or
// marked. Records of rows known gone (their transaction is visible, their
// row is not there: deleted) are deleted too, and returned in gone.
func (r *Relay) completeRecorded(ctx context.Context) (int, []string, error) {
	t, oid := r.tableIdent, "o."+r.idCol
	done := `UPDATE ` + t + ` o SET published_at = now()
			FROM ` + r.stateTable(confirmedTable) + ` c
			WHERE c.slot_name = $1 AND ` + oid + ` = c.id AND o.published_at IS NULL
			RETURNING ` + oid + ` AS id`
	if r.deleting() {
		done = `DELETE FROM ` + t + ` o
			USING ` + r.stateTable(confirmedTable) + ` c
			WHERE c.slot_name = $1 AND ` + oid + ` = c.id AND o.published_at IS NULL
			RETURNING ` + oid + ` AS id`
	}
	q := `WITH marked AS (` + done + `)
		DELETE FROM ` + r.stateTable(confirmedTable) + ` c
		WHERE c.slot_name = $1 AND (
			c.id IN (SELECT id FROM marked)
			OR EXISTS (SELECT 1 FROM ` + t + ` o WHERE ` + oid + ` = c.id AND o.published_at IS NOT NULL)
			OR (pg_visible_in_snapshot(c.xid, pg_current_snapshot())
				AND NOT EXISTS (SELECT 1 FROM ` + t + ` o WHERE ` + oid + ` = c.id)))
		RETURNING c.id::text, NOT EXISTS (SELECT 1 FROM ` + t + ` o WHERE ` + oid + ` = c.id)`
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	rows, err := r.opt.Pool.Query(qctx, q, r.cfg.Slot)
	if err != nil {
		return 0, nil, classifyPg(fmt.Errorf("mark recorded events: %w", err))
	}
	defer rows.Close()
	var gone []string
	n := 0
	for rows.Next() {
		var id string
		var isGone bool
		if err := rows.Scan(&id, &isGone); err != nil {
			return 0, nil, classifyPg(fmt.Errorf("mark recorded events: %w", err))
		}
		n++
		if isGone {
			gone = append(gone, id)
		}
	}
	if err := rows.Err(); err != nil {
		return 0, nil, classifyPg(fmt.Errorf("mark recorded events: %w", err))
	}
	return n, gone, nil
}

// noteDeleted counts published events whose rows the application deleted
// before the mark, and says so at most once a minute: an application that
// deletes each row in the transaction that inserts it (as Debezium users
// do) makes every event one of these.
func (s *session) noteDeleted(gone []string) {
	if len(gone) == 0 {
		return
	}
	s.r.m.RowsDeletedBeforeMark.Add(float64(len(gone)))
	s.deletedSinceLog += len(gone)
	if time.Since(s.deletedLogged) < time.Minute {
		return
	}
	s.log.Warn().Int("events", s.deletedSinceLog).Str("last", gone[len(gone)-1]).
		Msg("published events whose rows were deleted before they could be marked (outbox_relay_rows_deleted_before_mark_total)")
	s.deletedLogged, s.deletedSinceLog = time.Now(), 0
}

// remove drops the ids in done from ids.
func remove(ids, done []string) []string {
	if len(done) == 0 {
		return ids
	}
	gone := make(map[string]struct{}, len(done))
	for _, id := range done {
		gone[id] = struct{}{}
	}
	out := ids[:0]
	for _, id := range ids {
		if _, ok := gone[id]; !ok {
			out = append(out, id)
		}
	}
	return out
}

// markSQL is the statement that records the rows of the uuid[] parameter
// param as published, returning the ids it reached (as text): an UPDATE of
// published_at, or with RELAY_ON_PUBLISHED=delete a DELETE. Either reaches
// only visible rows not marked yet, so the marker's retries and the
// replay's checks are the same in both modes.
func (r *Relay) markSQL(param string) string {
	if r.deleting() {
		return `DELETE FROM ` + r.tableIdent + `
		WHERE ` + r.idCol + ` = ANY(` + param + `::uuid[]) AND published_at IS NULL RETURNING ` + r.idCol + `::text`
	}
	return `UPDATE ` + r.tableIdent + ` SET published_at = now()
		WHERE ` + r.idCol + ` = ANY(` + param + `::uuid[]) AND published_at IS NULL RETURNING ` + r.idCol + `::text`
}

// markRows marks (or deletes) the rows published and returns the ids it
// reached.
//
// In delete mode the same statement moves the slot's deleted_through to
// through, the batch's last stream position: every event up to it is
// confirmed (marks follow stream order), so the replay check knows a
// missing row up to it was published and one after it was deleted by the
// application. One more row version per batch, not per event.
func (r *Relay) markRows(ctx context.Context, ids []string, through streamPos) ([]string, error) {
	if !r.deleting() {
		return r.ids(ctx, "mark rows published", r.markSQL("$1"), ids)
	}
	if through.lsn == 0 { // swept rows only: no stream position to record
		return r.ids(ctx, "delete published rows", r.markSQL("$1"), ids)
	}
	q := `WITH d AS (` + r.markSQL("$1") + `), ` + r.deletedThroughCTE("$2", "$3", "$4") + `
		SELECT * FROM d`
	return r.ids(ctx, "delete published rows", q, ids, r.cfg.Slot, through.lsn.String(), through.event)
}

// deletedThroughCTE is a CTE (named dt) that moves the slot's
// deleted_through forward to the position ($lsn as text, $event), never
// back.
func (r *Relay) deletedThroughCTE(slot, lsn, event string) string {
	return `dt AS (INSERT INTO ` + r.stateTable(slotStateTable) + ` AS s (slot_name, sweep_pending, deleted_through, deleted_through_event)
			VALUES (` + slot + `, false, ` + lsn + `::text::pg_lsn, ` + event + `::int)
			ON CONFLICT (slot_name) DO UPDATE SET (deleted_through, deleted_through_event) =
				(excluded.deleted_through, excluded.deleted_through_event)
			WHERE s.deleted_through IS NULL OR (excluded.deleted_through, excluded.deleted_through_event) >
				(s.deleted_through, coalesce(s.deleted_through_event, 0)))`
}

// publishedRows returns the ids among ids whose rows are already marked,
// or whose confirmation is recorded (record): those count as published.
func (r *Relay) publishedRows(ctx context.Context, ids []string) ([]string, error) {
	q := `SELECT ` + r.idCol + `::text FROM ` + r.tableIdent + ` WHERE ` + r.idCol + ` = ANY($1::uuid[]) AND published_at IS NOT NULL
		UNION ALL
		SELECT id::text FROM ` + r.stateTable(confirmedTable) + ` WHERE slot_name = $2 AND id = ANY($1::uuid[])`
	return r.ids(ctx, "read published rows", q, ids, r.cfg.Slot)
}

func (r *Relay) ids(ctx context.Context, what, q string, args ...any) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	rows, err := r.opt.Pool.Query(ctx, q, args...)
	if err != nil {
		return nil, classifyPg(fmt.Errorf("%s: %w", what, err))
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, classifyPg(fmt.Errorf("%s: %w", what, err))
	}
	return out, nil
}

// replayRows sorts the ids of replayed events (xids: their transactions)
// into done (marked, or recorded as confirmed for this slot) and gone (no
// longer in the table, and not recorded). With RELAY_ON_PUBLISHED=delete a
// row the marker deleted is no longer there: a row missing whose
// transaction is visible is done (deleted after its confirm, or by the
// application: nothing to publish either way), and one whose transaction is
// not visible yet (a commit waiting for a synchronous standby) is neither,
// so it is published.
func (r *Relay) replayRows(ctx context.Context, ids []string, xids []int64, pos []streamPos) (done, gone []string, err error) {
	// $4: delete mode, where a missing row of a visible transaction that
	// committed at or before deleted_through is done (published, then
	// deleted by the relay or the application) and any other missing row
	// is neither done nor gone: the application deleted it before it was
	// published, or its transaction is not visible yet.
	q := `WITH cur AS (SELECT pg_current_snapshot() AS snap,
			pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax,
			(SELECT deleted_through FROM ` + r.stateTable(slotStateTable) + ` WHERE slot_name = $2) AS dt_lsn,
			(SELECT coalesce(deleted_through_event, 0) FROM ` + r.stateTable(slotStateTable) + ` WHERE slot_name = $2) AS dt_event)
		SELECT u.id::text, d.done, o.` + r.idCol + ` IS NULL AND NOT d.done AND NOT ($4 AND u.xid <> 0)
		FROM unnest($1::uuid[], $3::bigint[], $5::text[], $6::int[]) AS u(id, xid, lsn, event)
		CROSS JOIN cur
		LEFT JOIN ` + r.tableIdent + ` o ON o.` + r.idCol + ` = u.id
		CROSS JOIN LATERAL (SELECT COALESCE(o.published_at IS NOT NULL, false) OR EXISTS (
			SELECT 1 FROM ` + r.stateTable(confirmedTable) + ` c WHERE c.slot_name = $2 AND c.id = u.id)) AS s(done)
		CROSS JOIN LATERAL (SELECT s.done OR ($4 AND o.` + r.idCol + ` IS NULL AND u.xid <> 0
			AND cur.dt_lsn IS NOT NULL AND (u.lsn::pg_lsn, u.event) <= (cur.dt_lsn, cur.dt_event)
			AND pg_visible_in_snapshot(` + widenXid("u.xid") + `, cur.snap))) AS d(done)`
	lsns, events := make([]string, len(pos)), make([]int32, len(pos))
	for i, p := range pos {
		lsns[i], events[i] = p.lsn.String(), p.event
	}
	args := []any{ids, r.cfg.Slot, xids, r.deleting(), lsns, events}
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	rows, err := r.opt.Pool.Query(qctx, q, args...)
	if err != nil {
		return nil, nil, classifyPg(fmt.Errorf("read replayed rows: %w", err))
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var isDone, isGone bool
		if err := rows.Scan(&id, &isDone, &isGone); err != nil {
			return nil, nil, classifyPg(fmt.Errorf("read replayed rows: %w", err))
		}
		switch {
		case isDone:
			done = append(done, id)
		case isGone:
			gone = append(gone, id)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, classifyPg(fmt.Errorf("read replayed rows: %w", err))
	}
	return done, gone, nil
}

// deletedRows returns the ids whose transaction is visible to a new
// snapshot but whose row is not there: deleted after insert, so there is
// nothing to mark. Rows of transactions not yet visible are kept waiting.
func (s *session) deletedRows(ctx context.Context, ids []string, batch []*item) ([]string, error) {
	xidOf := make(map[string]uint32, len(batch))
	for _, it := range batch {
		xidOf[it.ev.ID] = it.xid
	}
	xids := make([]int64, len(ids))
	for i, id := range ids {
		xids[i] = int64(xidOf[id])
	}
	return s.r.db.rowsGone(ctx, ids, xids)
}

// rowsGone returns the ids whose transaction (xids[i]; 0 for a swept row)
// is visible and whose row is not there, in one statement: a table whose
// application deletes each row in the transaction that inserts it
// (Debezium's habit) has every row of every batch here.
func (r *Relay) rowsGone(ctx context.Context, ids []string, xids []int64) ([]string, error) {
	q := `WITH cur AS (SELECT pg_current_snapshot() AS snap,
			pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax)
		SELECT u.id::text FROM unnest($1::uuid[], $2::bigint[]) AS u(id, xid) CROSS JOIN cur
		WHERE (u.xid = 0 OR pg_visible_in_snapshot(` + widenXid("u.xid") + `, cur.snap))
			AND NOT EXISTS (SELECT 1 FROM ` + r.tableIdent + ` o WHERE o.` + r.idCol + ` = u.id)`
	return r.ids(ctx, "check deleted rows", q, ids, xids)
}

// filterPublished marks replayed items whose rows are already published as
// skip. Marks follow stream order, so once a batch ends on an unmarked row
// every later row is unmarked too (but for one partially visible mark batch,
// whose stragglers can be published twice, as in any crash window), and
// filtering stops for the rest of the session.
func (s *session) filterPublished(ctx context.Context, batch []*item) error {
	ids := make([]string, 0, len(batch))
	xids := make([]int64, 0, len(batch))
	pos := make([]streamPos, 0, len(batch))
	for _, it := range batch {
		if !it.sweep && it.ev.ID != "" && !it.ev.Published {
			ids = append(ids, it.ev.ID)
			xids = append(xids, int64(it.xid))
			pos = append(pos, it.pos)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	published, gone, err := s.r.db.replayRows(ctx, ids, xids, pos)
	if err != nil {
		return err
	}
	done := make(map[string]struct{}, len(published))
	for _, id := range published {
		done[id] = struct{}{}
	}
	for _, it := range batch {
		if _, ok := done[it.ev.ID]; ok && !it.sweep {
			it.fate = fateSkip
		}
	}
	// The last row still in the table decides: a row deleted since says
	// nothing of whether it was published (it is published again), and
	// one deleted row ending a batch used to stop the filter, so that
	// every marked row after it was published again (the simulator, seed
	// 5382: 46 duplicates after one crash).
	missing := make(map[string]struct{}, len(gone))
	for _, id := range gone {
		missing[id] = struct{}{}
	}
	last := ""
	for i := len(ids) - 1; i >= 0 && last == ""; i-- {
		if _, ok := missing[ids[i]]; !ok {
			last = ids[i]
		}
	}
	if _, lastDone := done[last]; last != "" && !lastDone {
		s.filtering = false
		if len(published) > 0 {
			s.log.Info().Int("skipped", len(published)).Msg("replay: skipped events already marked published")
		}
	}
	return nil
}
