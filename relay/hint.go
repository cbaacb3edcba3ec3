package relay

import (
	"errors"
	"fmt"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/config"
)

// settingHint names the setting behind a database error and the value that
// would work, or returns "" when the error is not about a setting. The
// relay's sessions run under their own limits (internal/pgsession), so these
// are the relay's limits, or a server-wide setting no session can override.
func settingHint(err error, cfg *config.Config) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return ""
	}
	switch pgErr.Code {
	case pgerrcode.QueryCanceled:
		return fmt.Sprintf("a statement ran into statement_timeout, which the relay sets to RELAY_POSTGRES_TIMEOUT (%s) "+
			"for its own sessions: raise RELAY_POSTGRES_TIMEOUT (or find what slows the statement: pg_stat_activity)",
			cfg.PostgresTimeout)
	case pgerrcode.IdleInTransactionSessionTimeout:
		return fmt.Sprintf("idle_in_transaction_session_timeout ended a transaction of the relay; the relay sets it to "+
			"RELAY_POSTGRES_TIMEOUT (%s) for its own sessions: raise RELAY_POSTGRES_TIMEOUT", cfg.PostgresTimeout)
	case pgerrcode.LockNotAvailable:
		return fmt.Sprintf("lock_timeout (%s, half of RELAY_POSTGRES_TIMEOUT) passed while marking rows: another "+
			"transaction holds locks on outbox rows (pg_locks); end it, or raise RELAY_POSTGRES_TIMEOUT", cfg.PostgresTimeout/2)
	case pgerrcode.ReadOnlySQLTransaction:
		return "the server refuses writes: it is a standby, or read-only for every session (default_transaction_read_only " +
			"is overridden by the relay, so this is a standby or a read-only server): point RELAY_DATABASE_URL at the " +
			"primary (a multi-host URL with target_session_attrs=read-write finds it after a failover)"
	case pgerrcode.TooManyConnections:
		return "max_connections, or the role's CONNECTION LIMIT, is reached: the relay needs up to 7 connections " +
			"(a replication connection, its ownership lock, a pool of up to 4, and `status` 1); max_wal_senders and " +
			"max_replication_slots must leave room for its walsender and slot too"
	case pgerrcode.ProtocolViolation, pgerrcode.FeatureNotSupported:
		return "the server refused the relay's protocol: a connection pooler such as PgBouncer between the relay and " +
			"PostgreSQL cannot carry a replication connection, nor hold the session-level lock that makes one relay the " +
			"slot's owner; point RELAY_DATABASE_URL at PostgreSQL itself"
	case pgerrcode.ConfigurationLimitExceeded:
		return "a server limit is reached: max_replication_slots (raise it, or drop replication slots nobody uses: " +
			"pg_replication_slots), or temp_file_limit, which a role or database may set and only a superuser can " +
			"override (the relay holds a sweep page in work_mem, which it sets; a larger row spills): raise or RESET it " +
			"for the relay's role (ALTER ROLE … SET temp_file_limit)"
	}
	return ""
}
