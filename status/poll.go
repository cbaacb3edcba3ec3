package status

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// querier is what Poll needs; *pgxpool.Pool satisfies it.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Poll sets the gauges only the database knows — WAL retained by the slot,
// unpublished rows and the age of the oldest — once at start and then every
// interval, until ctx ends. It is one short query per interval; the relay
// starts it only when RELAY_STATUS_POLL_INTERVAL is set, because an idle
// relay otherwise sends no queries at all. A failed poll is logged and
// retried at the next tick; the gauges keep their last value.
func Poll(ctx context.Context, db querier, slot, schema, table, timeCol string, m *metrics.Metrics, every time.Duration, log zerolog.Logger) {
	log = log.With().Str("component", "status-poll").Logger()
	tick := time.NewTicker(every)
	defer tick.Stop()
	failing := false
	atRisk := false
	for {
		walStatus, err := pollOnce(ctx, db, slot, schema, table, timeCol, m)
		// Say once, before the slot is lost, that it is about to be:
		// max_slot_wal_keep_size is reached while the relay lags or is
		// stopped, and the WAL it needs goes at the next checkpoint.
		if risky := walStatus == "unreserved"; risky != atRisk {
			atRisk = risky
			if risky {
				log.Error().Str("slot", slot).Msg("the slot's WAL is past max_slot_wal_keep_size (wal_status unreserved): " +
					"it will be lost at the next checkpoint unless the relay catches up; the table sweep then recovers " +
					"its unpublished rows; raise max_slot_wal_keep_size or find what slows the relay")
			} else {
				log.Info().Str("slot", slot).Msg("the slot's WAL is within max_slot_wal_keep_size again")
			}
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && !failing:
			log.Warn().Err(err).Msg("status poll failed; the slot and unpublished-row gauges are stale until it succeeds")
			failing = true
		case err != nil:
			log.Debug().Err(err).Msg("status poll failed again")
		case failing:
			log.Info().Msg("status poll recovered")
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// PollOnce reads the slot's retained WAL and safe WAL size and the
// unpublished rows in one query and sets the gauges. A slot that does not
// exist retains no WAL.
func PollOnce(ctx context.Context, db querier, slot, schema, table, timeCol string, m *metrics.Metrics) error {
	_, err := pollOnce(ctx, db, slot, schema, table, timeCol, m)
	return err
}

func pollOnce(ctx context.Context, db querier, slot, schema, table, timeCol string, m *metrics.Metrics) (walStatus string, err error) {
	q := `WITH s AS (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,
				safe_wal_size, wal_status
			FROM pg_replication_slots WHERE slot_name = $1)
		SELECT
			coalesce((SELECT retained FROM s), 0),
			coalesce((SELECT safe_wal_size FROM s), -1),
			coalesce((SELECT wal_status FROM s), ''),
			count(*),
			coalesce(` + oldestExpr(timeCol) + `, 0)::float8
		FROM ` + pgx.Identifier{schema, table}.Sanitize() + ` WHERE published_at IS NULL`
	var retained, safe, unpublished int64
	var oldest float64
	if err := db.QueryRow(ctx, q, slot).Scan(&retained, &safe, &walStatus, &unpublished, &oldest); err != nil {
		return "", fmt.Errorf("poll slot %q and %s.%s: %w", slot, schema, table, err)
	}
	m.SlotWALRetained.Set(float64(retained))
	m.SlotSafeWAL.Set(float64(safe))
	m.Unpublished.Set(float64(unpublished))
	m.OldestUnpublishd.Set(oldest)
	return walStatus, nil
}
