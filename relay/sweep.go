package relay

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// beginSweep opens a read-only transaction on the slot's exported snapshot.
// Rows visible in it never come through the slot, so the unpublished ones
// among them must be published from the table (invariant 7).
func (r *Relay) beginSweep(ctx context.Context, snapshot string) (pgx.Tx, error) {
	tx, err := r.opt.Pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, classifyPg(fmt.Errorf("begin table sweep: %w", err))
	}
	if _, err := tx.Exec(ctx, `SET TRANSACTION SNAPSHOT `+migrations.QuoteLiteral(snapshot)); err != nil {
		_ = tx.Rollback(ctx)
		return nil, classifyPg(fmt.Errorf("import slot snapshot: %w", err))
	}
	return tx, nil
}

// sweep feeds the unpublished rows of the snapshot into the pipeline, in
// occurred_at order, with a cursor so that a backlog of millions of rows
// takes bounded memory.
func (s *session) sweep(soft, ctx context.Context, tx pgx.Tx) error {
	defer tx.Rollback(context.Background()) //nolint:errcheck // read-only
	r := s.r
	q := `DECLARE outbox_relay_sweep NO SCROLL CURSOR FOR
		SELECT id::text, aggregate_type, aggregate_id::text, event_type, payload::text, occurred_at
		FROM ` + r.tableIdent + ` WHERE published_at IS NULL ORDER BY occurred_at, id`
	if _, err := tx.Exec(ctx, q); err != nil {
		return classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	ctr := s.tracker.Begin()
	closed := false
	defer func() {
		if !closed {
			s.tracker.Close(ctr, 0)
		}
	}()
	total := 0
	lastLog := time.Now()
	for soft.Err() == nil {
		rows, err := tx.Query(ctx, `FETCH 1000 FROM outbox_relay_sweep`)
		if err != nil {
			return classifyPg(fmt.Errorf("table sweep: %w", err))
		}
		n := 0
		for rows.Next() {
			var ev decoder.Event
			var payload string
			if err := rows.Scan(&ev.ID, &ev.AggregateType, &ev.AggregateID, &ev.EventType, &payload, &ev.OccurredAt); err != nil {
				rows.Close()
				return classifyPg(fmt.Errorf("table sweep: %w", err))
			}
			ev.Payload = []byte(payload)
			n++
			s.tracker.Add(ctr)
			// Not streaming yet: no status to send while the pipeline is full.
			if err := s.send(ctx, &item{tx: ctr, sweep: true, ev: ev}, nil); err != nil {
				rows.Close()
				return err
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return classifyPg(fmt.Errorf("table sweep: %w", err))
		}
		total += n
		r.m.SweptEvents.Add(float64(n))
		if n == 0 {
			break
		}
		if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			s.log.Info().Int("rows", total).Msg("table sweep in progress")
		}
	}
	if soft.Err() != nil {
		return nil // interrupted: the sweep stays pending and runs again on a new slot
	}
	closed = true
	s.tracker.Close(ctr, 0)
	// The sweep is finished only when every swept row is confirmed and marked.
	for s.tracker.InFlight() > 0 {
		if !sleep(ctx, 10*time.Millisecond) {
			return ctx.Err()
		}
	}
	if err := r.setSweepPending(ctx, false); err != nil {
		return err
	}
	s.log.Warn().Int("rows", total).Msg("table sweep done: published the unpublished rows the slot will never deliver")
	return nil
}
