package main

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/status"
)

// watchFailover keeps /readyz's failover slot row current
// (RELAY_FAILOVER_SLOT), every RELAY_STATUS_POLL_INTERVAL or else every
// minute, and warns once when the server has no failover slots: the relay
// then carries on with an ordinary slot.
func watchFailover(ctx context.Context, cfg *config.Config, pool *pgxpool.Pool, m *metrics.Metrics, log zerolog.Logger) {
	every := cfg.StatusPollInterval
	if every <= 0 {
		every = time.Minute
	}
	m.SetFailoverSlot("on; not read yet")
	warned := false
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		qctx, cancel := context.WithTimeout(ctx, cfg.PostgresTimeout)
		f, err := status.ReadFailover(qctx, pool, cfg.DatabaseURL, cfg.Slot, true)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			m.SetFailoverSlot("on; unknown, the last read failed")
			log.Debug().Err(err).Msg("reading the failover slot's state failed")
		default:
			m.SetFailoverSlot(f.Summary())
			if !f.Supported && !warned {
				warned = true
				log.Warn().Str("server_version", f.ServerVersion).Str("slot", cfg.Slot).
					Msg("RELAY_FAILOVER_SLOT=true, but the server is PostgreSQL " + f.ServerVersion +
						" and failover slots need 17: using an ordinary slot. A promoted standby will not have it; " +
						"the relay then creates it again and sweeps the table for the rows not marked published")
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
