package main

import (
	"context"
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/retention"
	"github.com/outbox-relay/outbox-relay/status"
)

// startBackground starts the optional periodic database work beside the
// relay: retention (RELAY_RETENTION), the status poll
// (RELAY_STATUS_POLL_INTERVAL) and the failover slot's state
// (RELAY_FAILOVER_SLOT). All are off by default, so an idle relay sends no
// queries. The returned function stops them and waits, and must
// run before the pool is closed.
func startBackground(ctx context.Context, cfg *config.Config, pool *pgxpool.Pool, m *metrics.Metrics, log zerolog.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	schema, table, _ := config.SplitTable(cfg.Table)
	if cfg.Retention > 0 {
		log.Info().Stringer("retention", cfg.Retention).Stringer("interval", cfg.RetentionInterval).
			Msg("background retention on (RELAY_RETENTION): published rows older than this are deleted")
		wg.Go(func() {
			retention.Run(ctx, pool, retention.Table{Schema: schema, Name: table}, cfg.Retention,
				retention.DefaultBatchSize, cfg.RetentionInterval, log)
		})
	}
	if cfg.StatusPollInterval > 0 {
		wg.Go(func() {
			status.Poll(ctx, pool, cfg.Slot, schema, table, cfg.TimeColumn(), m, cfg.StatusPollInterval, log)
		})
	}
	if cfg.FailoverSlot {
		wg.Go(func() { watchFailover(ctx, cfg, pool, m, log) })
	} else {
		m.SetFailoverSlot("off")
	}
	return func() {
		cancel()
		wg.Wait()
	}
}
