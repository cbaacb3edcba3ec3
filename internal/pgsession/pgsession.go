// Package pgsession gives every PostgreSQL session of the relay its own
// settings, so that it never inherits by accident what a role, a database
// or postgresql.conf sets for the applications (invariant 12: the relay's
// sessions run under its own timeouts, and no commit waits on the relay).
//
// Settings sent in the startup packet take precedence over ALTER ROLE and
// ALTER DATABASE defaults, so a DBA's `statement_timeout = '40ms'` on the
// database does not reach the relay, and neither does
// `default_transaction_read_only = on` or `synchronous_commit = remote_apply`.
package pgsession

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Bounds are the limits of the relay's ordinary (pool) sessions.
type Bounds struct {
	// Statement bounds one statement (statement_timeout): RELAY_POSTGRES_TIMEOUT.
	Statement time.Duration
}

// Lock is the lock_timeout of a pool session: half the statement bound, so
// that a mark stuck behind an application's row lock fails with an error
// that names the lock rather than a generic statement timeout.
func (b Bounds) Lock() time.Duration { return b.Statement / 2 }

// Pool sets the relay's settings on the configuration of a pool session
// (marks, the table sweep's pages, state, status, retention).
//
//   - statement_timeout, lock_timeout and idle_in_transaction_session_timeout
//     are the relay's own, derived from RELAY_POSTGRES_TIMEOUT;
//   - synchronous_commit = local: the relay's own writes (marks, its state
//     table) never wait for a synchronous standby. Where the relay's
//     walsender is itself chosen as a synchronous standby, waiting would
//     wait on the relay. The trade-off: after a failover, marks that had
//     not reached the standby are lost, and their rows are published again
//     (duplicates, never loss);
//   - default_transaction_read_only = off and read committed isolation,
//     which the mark's visibility retry relies on;
//   - idle_session_timeout = 0 (14+) and transaction_timeout = 0 (17+)
//     where the server knows them: an idle relay's sessions stay open,
//     and the table sweep's transaction lasts as long as the sweep.
//
// A timed-out query is cancelled on the server as well (a cancel request),
// not only abandoned by the client: otherwise an UPDATE could go on holding
// row locks that the next session's mark then waits on.
func Pool(c *pgconn.Config, b Bounds) {
	set(c, map[string]string{
		"statement_timeout":                   ms(b.Statement),
		"lock_timeout":                        ms(b.Lock()),
		"idle_in_transaction_session_timeout": ms(b.Statement),
		"synchronous_commit":                  "local",
		"default_transaction_read_only":       "off",
		"default_transaction_isolation":       "read committed",
	})
	c.BuildContextWatcherHandler = cancelOnServer
}

// Replication sets the relay's settings on the replication connection. Its
// bounds are its own: RELAY_POSTGRES_TIMEOUT of silence on the stream and
// the server's wal_sender_timeout. A statement or idle-in-transaction
// timeout inherited from the database would kill the walsender while it
// holds the snapshot that the table sweep reads (EXPORT_SNAPSHOT keeps a
// transaction open until the next command), or while it waits for the
// transactions that slot creation must outlive.
func Replication(c *pgconn.Config) {
	set(c, map[string]string{
		"statement_timeout":                   "0",
		"lock_timeout":                        "0",
		"idle_in_transaction_session_timeout": "0",
		"synchronous_commit":                  "local",
	})
	c.BuildContextWatcherHandler = cancelOnServer
}

func set(c *pgconn.Config, params map[string]string) {
	if c.RuntimeParams == nil {
		c.RuntimeParams = map[string]string{}
	}
	for k, v := range params {
		c.RuntimeParams[k] = v
	}
	prev := c.AfterConnect
	c.AfterConnect = func(ctx context.Context, pg *pgconn.PgConn) error {
		if prev != nil {
			if err := prev(ctx, pg); err != nil {
				return err
			}
		}
		// Settings of newer servers cannot go in the startup packet: an
		// older server refuses an unknown parameter there.
		// idle_session_timeout (14+) would close an idle relay's sessions;
		// transaction_timeout (17+) would end the table sweep's transaction,
		// and the exported-snapshot transaction of the walsender it reads.
		major := ServerMajor(pg)
		for _, set := range []struct {
			since int
			sql   string
		}{
			{14, `SET idle_session_timeout = 0`},
			{17, `SET transaction_timeout = 0`},
		} {
			if major < set.since {
				continue
			}
			if _, err := pg.Exec(ctx, set.sql).ReadAll(); err != nil {
				return fmt.Errorf("%s: %w", set.sql, err)
			}
		}
		return nil
	}
}

// ServerMajor returns the server's major version (15 for "15.4 (Debian…)"),
// or 0 when it cannot tell.
func ServerMajor(pg *pgconn.PgConn) int {
	return Major(pg.ParameterStatus("server_version"))
}

// Major returns the major version of a server_version string: its leading
// digits, so "15.4 (Debian…)", "17beta1" and "18devel" give 15, 17 and 18;
// 0 when it has none.
func Major(serverVersion string) int {
	end := 0
	for end < len(serverVersion) && serverVersion[end] >= '0' && serverVersion[end] <= '9' {
		end++
	}
	n, _ := strconv.Atoi(serverVersion[:end])
	return n
}

// cancelOnServer sends a cancel request as soon as a query's context ends,
// and closes the connection one second later if the server has not
// answered by then.
func cancelOnServer(pg *pgconn.PgConn) ctxwatch.Handler {
	return &pgconn.CancelRequestContextWatcherHandler{Conn: pg, CancelRequestDelay: 0, DeadlineDelay: time.Second}
}

func ms(d time.Duration) string {
	if d <= 0 {
		return "0"
	}
	return strconv.FormatInt(max(1, d.Milliseconds()), 10)
}

// PoolConfig parses a database URL into the configuration of a relay pool:
// application_name outbox-relay, a connect timeout, and Pool's settings.
// The error never quotes the URL, which may hold a password.
func PoolConfig(databaseURL string, maxConns int32, b Bounds) (*pgxpool.Config, error) {
	pc, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return nil, errors.New("RELAY_DATABASE_URL is not a valid PostgreSQL connection string")
	}
	pc.MaxConns = maxConns
	pc.ConnConfig.RuntimeParams["application_name"] = "outbox-relay"
	if pc.ConnConfig.ConnectTimeout == 0 {
		pc.ConnConfig.ConnectTimeout = 15 * time.Second
	}
	Pool(&pc.ConnConfig.Config, b)
	return pc, nil
}
