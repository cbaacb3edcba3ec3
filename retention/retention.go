// Package retention deletes published outbox rows older than a cut-off, in
// batches, so that the table does not grow forever.
//
// Guarantees:
//   - Only rows with published_at IS NOT NULL and published_at before the
//     cut-off are deleted; the condition is checked again by the DELETE
//     itself, so a row is never deleted on the strength of a stale read.
//     Unpublished rows are never touched, however old.
//   - Each batch is one statement in its own transaction. Interrupting a
//     prune (cancelling ctx, killing the process) leaves the batch in
//     progress either committed or rolled back as a whole; the table is
//     consistent at every point. The count returned on interruption may miss
//     that last batch, if it committed just as the statement was cancelled.
//   - The cut-off is fixed once, from the database clock (the clock that set
//     published_at), when Prune starts.
//
// Deletes do not come back through the replication slot: the publication
// publishes inserts only.
package retention

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
)

// DefaultBatchSize is the number of rows one DELETE removes at most.
const DefaultBatchSize = 5000

// Table names the outbox table.
type Table struct {
	Schema, Name string
}

func (t Table) String() string { return t.Schema + "." + t.Name }

// DB is what Prune needs: *pgxpool.Pool satisfies it. Each QueryRow runs in
// its own transaction.
type DB interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Prune deletes rows published before now() − olderThan, at most batchSize
// per statement, and returns how many it deleted. progress, if not nil, is
// called after every batch that deleted rows with the running total. On
// error or cancellation the count deleted so far is returned with the error.
//
// Batches walk the table in physical order (a TID range scan from the last
// batch's highest ctid), so each batch reads only what is left of the table
// rather than rescanning the dead tuples its predecessors left behind. If a
// pass took more than one batch, another pass from the start follows, in
// case the planner did not return rows in physical order; it ends when a
// pass deletes nothing.
func Prune(ctx context.Context, db DB, t Table, olderThan time.Duration, batchSize int, progress func(deleted int64)) (int64, error) {
	if olderThan <= 0 {
		return 0, fmt.Errorf("retention: olderThan must be positive, got %s", olderThan)
	}
	if batchSize <= 0 {
		return 0, fmt.Errorf("retention: batch size must be positive, got %d", batchSize)
	}
	var cutoff time.Time
	if err := db.QueryRow(ctx, `SELECT now() - $1::bigint * interval '1 microsecond'`,
		olderThan.Microseconds()).Scan(&cutoff); err != nil {
		return 0, fmt.Errorf("retention: read the database clock: %w", err)
	}

	ident := pgx.Identifier{t.Schema, t.Name}.Sanitize()
	// ctid = ANY(ARRAY(…)) plans as a TID scan; ctid IN (SELECT …) may not.
	q := `WITH batch AS (
			SELECT ctid FROM ` + ident + `
			WHERE ctid > $1::tid AND published_at IS NOT NULL AND published_at < $2
			LIMIT $3
		), del AS (
			DELETE FROM ` + ident + `
			WHERE ctid = ANY(ARRAY(SELECT ctid FROM batch))
			  AND published_at IS NOT NULL AND published_at < $2
			RETURNING 1
		)
		SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM batch), (SELECT max(ctid)::text FROM batch)`

	const start = "(0,0)"
	var total, passDeleted int64
	after, batches := start, 0
	for {
		var deleted, selected int64
		var last *string
		if err := db.QueryRow(ctx, q, after, cutoff, batchSize).Scan(&deleted, &selected, &last); err != nil {
			if ctx.Err() != nil {
				return total, ctx.Err()
			}
			return total, fmt.Errorf("retention: delete from %s: %w", t, err)
		}
		total += deleted
		passDeleted += deleted
		batches++
		if deleted > 0 && progress != nil {
			progress(total)
		}
		if selected < int64(batchSize) || last == nil {
			// End of a pass over the table.
			if batches == 1 || passDeleted == 0 {
				return total, nil
			}
			after, batches, passDeleted = start, 0, 0
			continue
		}
		after = *last
	}
}

// Run prunes every interval until ctx ends: once at start, then on a
// ticker. Each pass is logged at info with the count deleted; a failed pass
// is logged and retried at the next tick, so retention never stops the
// relay. It returns when ctx ends.
func Run(ctx context.Context, db DB, t Table, olderThan time.Duration, batchSize int, interval time.Duration, log zerolog.Logger) {
	log = log.With().Str("component", "retention").Str("table", t.String()).
		Stringer("older_than", olderThan).Logger()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		began := time.Now()
		n, err := Prune(ctx, db, t, olderThan, batchSize, nil)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			log.Error().Err(err).Int64("deleted", n).Msg("retention pass failed; retrying at the next interval")
		default:
			log.Info().Int64("deleted", n).Stringer("took", time.Since(began).Round(time.Millisecond)).
				Msg("retention pass: deleted published rows older than the cut-off")
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
