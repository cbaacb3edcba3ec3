package relay

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// mark sets published_at for confirmed events in batches and only then
// finishes them in the tracker.
func (s *session) mark(ctx context.Context) error {
	defer close(s.drained)
	max := s.r.cfg.MarkBatchSize
	linger := s.r.cfg.MarkDelay
	batch := make([]*item, 0, max)
	for {
		it, ok, err := recv(ctx, s.confirmed)
		if err != nil || !ok {
			return err
		}
		batch = append(batch[:0], it)
		// Wait up to RELAY_MARK_DELAY for more: one UPDATE (and one commit
		// flush) for many events. It delays the acknowledgement, never the
		// delivery, and it takes the database's fsyncs away from the
		// producers' commits.
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
			s.unmarked = batch // carried over once the session has stopped
			return err
		}
	}
}

func (s *session) markBatch(ctx context.Context, batch []*item) error {
	ids := make([]string, 0, len(batch))
	for _, it := range batch {
		if !it.skip {
			ids = append(ids, it.ev.ID)
		}
	}
	bo := newBackoff(time.Millisecond, 500*time.Millisecond)
	started := time.Now()
	warned := false
	for attempt := 0; len(ids) > 0; attempt++ {
		t0 := time.Now()
		marked, err := s.r.markRows(ctx, ids)
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
		already, err := s.r.publishedRows(ctx, ids)
		if err != nil {
			return err
		}
		ids = remove(ids, already)
		if len(ids) == 0 {
			break
		}
		if attempt >= 3 {
			gone, err := s.deletedRows(ctx, ids, batch)
			if err != nil {
				return err
			}
			if len(gone) > 0 {
				s.log.Warn().Strs("ids", gone).Msg("published events whose rows were deleted before they could be marked")
			}
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
		if it.skip {
			m.EventsSkipped.Inc()
		} else if it.dead == "" {
			m.EventsPublished.Inc()
		}
		s.tracker.Finish(it.tx, 1)
	}
	return nil
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

// markRows marks the rows published and returns the ids it updated.
func (r *Relay) markRows(ctx context.Context, ids []string) ([]string, error) {
	q := `UPDATE ` + r.tableIdent + ` SET published_at = now()
		WHERE id = ANY($1::uuid[]) AND published_at IS NULL RETURNING id::text`
	return r.ids(ctx, "mark rows published", q, ids)
}

// publishedRows returns the ids among ids whose rows are already marked.
func (r *Relay) publishedRows(ctx context.Context, ids []string) ([]string, error) {
	q := `SELECT id::text FROM ` + r.tableIdent + ` WHERE id = ANY($1::uuid[]) AND published_at IS NOT NULL`
	return r.ids(ctx, "read published rows", q, ids)
}

func (r *Relay) ids(ctx context.Context, what, q string, ids []string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	rows, err := r.opt.Pool.Query(ctx, q, ids)
	if err != nil {
		return nil, classifyPg(fmt.Errorf("%s: %w", what, err))
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, classifyPg(fmt.Errorf("%s: %w", what, err))
	}
	return out, nil
}

// deletedRows returns the ids whose transaction is visible to a new
// snapshot but whose row is not there: deleted after insert, so there is
// nothing to mark. Rows of transactions not yet visible are kept waiting.
func (s *session) deletedRows(ctx context.Context, ids []string, batch []*item) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.r.cfg.PostgresTimeout)
	defer cancel()
	waiting := make(map[string]*item, len(batch))
	for _, it := range batch {
		waiting[it.ev.ID] = it
	}
	var gone []string
	for _, id := range ids {
		it := waiting[id]
		visible := true
		if it.xid != 0 {
			// Widen the 32-bit xid with the epoch of the current snapshot.
			err := s.r.opt.Pool.QueryRow(ctx, `
				WITH cur AS (SELECT pg_current_snapshot() AS snap,
					pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax)
				SELECT pg_visible_in_snapshot(
					((((xmax >> 32) - CASE WHEN $1::bigint > (xmax & 4294967295) THEN 1 ELSE 0 END) << 32) | $1::bigint)::text::xid8,
					snap)
				FROM cur`, int64(it.xid)).Scan(&visible)
			if err != nil {
				return nil, classifyPg(fmt.Errorf("check transaction visibility: %w", err))
			}
		}
		if !visible {
			continue
		}
		var exists bool
		err := s.r.opt.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+s.r.tableIdent+` WHERE id = $1::uuid)`, id).Scan(&exists)
		if err != nil {
			return nil, classifyPg(fmt.Errorf("check row exists: %w", err))
		}
		if !exists {
			gone = append(gone, id)
		}
	}
	return gone, nil
}

// filterPublished marks replayed items whose rows are already published as
// skip. Marks follow stream order, so once a batch ends on an unmarked row
// every later row is unmarked too (but for one partially visible mark batch,
// whose stragglers can be published twice, as in any crash window), and
// filtering stops for the rest of the session.
func (s *session) filterPublished(ctx context.Context, batch []*item) error {
	ids := make([]string, 0, len(batch))
	for _, it := range batch {
		if !it.sweep && it.ev.ID != "" && !it.ev.Published {
			ids = append(ids, it.ev.ID)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	published, err := s.r.publishedRows(ctx, ids)
	if err != nil {
		return err
	}
	done := make(map[string]struct{}, len(published))
	for _, id := range published {
		done[id] = struct{}{}
	}
	for _, it := range batch {
		if _, ok := done[it.ev.ID]; ok && !it.sweep {
			it.skip = true
		}
	}
	if _, lastDone := done[ids[len(ids)-1]]; !lastDone {
		s.filtering = false
		if len(published) > 0 {
			s.log.Info().Int("skipped", len(published)).Msg("replay: skipped events already marked published")
		}
	}
	return nil
}
