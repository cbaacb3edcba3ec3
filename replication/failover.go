package replication

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/pgquote"
	"github.com/outbox-relay/outbox-relay/internal/pgsession"
)

// FailoverSince is the first PostgreSQL major version with failover slots:
// CREATE_REPLICATION_SLOT's FAILOVER option, ALTER_REPLICATION_SLOT, and
// standbys that keep a synchronised copy (sync_replication_slots).
const FailoverSince = 17

// FailoverSupported reports whether a server of this major version can keep
// a failover slot.
func FailoverSupported(major int) bool { return major >= FailoverSince }

// Option configures a Conn.
type Option func(*Conn)

// WithFailoverSlot asks for a failover slot (RELAY_FAILOVER_SLOT). On 17
// and later CreateSlot creates the slot with FAILOVER and Start first
// makes an existing slot one; before 17 both do exactly what they do
// without it, and the caller says so (FailoverSupported).
func WithFailoverSlot(on bool) Option { return func(c *Conn) { c.failover = on } }

// commander is what slot setup needs of the replication connection: the
// server's version and simple-protocol commands (the walsender takes no
// other). pgWire is the real one; the tests' fake records the commands.
type commander interface {
	ParameterStatus(key string) string
	Run(ctx context.Context, sql string) ([]*pgconn.Result, error)
}

type pgWire struct{ pg *pgconn.PgConn }

func (w pgWire) ParameterStatus(key string) string { return w.pg.ParameterStatus(key) }

func (w pgWire) Run(ctx context.Context, sql string) ([]*pgconn.Result, error) {
	return w.pg.Exec(ctx, sql).ReadAll()
}

// ServerVersion is the server's server_version, as it reported it at
// connection start ("15.20 (Debian 15.20-0+deb12u1)").
func (c *Conn) ServerVersion() string { return c.w.ParameterStatus("server_version") }

// ServerMajor is the server's major version (15), 0 when unknown.
func (c *Conn) ServerMajor() int { return pgsession.Major(c.ServerVersion()) }

// failoverOn reports whether this connection's slot commands ask for
// failover: wanted, and the server has it.
func (c *Conn) failoverOn() bool { return c.failover && FailoverSupported(c.ServerMajor()) }

// createSlotSQL is the CREATE_REPLICATION_SLOT command. Without failover it
// is byte for byte what pglogrepl.CreateReplicationSlot sends for a
// permanent logical slot exporting its snapshot (the legacy syntax; the
// empty TEMPORARY makes the double space), so that servers before 17, or
// a relay without RELAY_FAILOVER_SLOT, see no change. With it, the option
// list of 15+, to which 17 added FAILOVER. The name is quoted there, which
// costs nothing (RELAY_SLOT no longer allows the leading digit the
// replication scanner cannot read unquoted).
func createSlotSQL(name string, failover bool) string {
	if !failover {
		return fmt.Sprintf("CREATE_REPLICATION_SLOT %s %s %s %s %s",
			name, "", pglogrepl.LogicalReplication, "pgoutput", "EXPORT_SNAPSHOT")
	}
	return "CREATE_REPLICATION_SLOT " + pgx.Identifier{name}.Sanitize() +
		" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)"
}

// alterFailoverSQL makes an existing slot a failover slot (17+).
func alterFailoverSQL(name string) string {
	return "ALTER_REPLICATION_SLOT " + pgx.Identifier{name}.Sanitize() + " ( FAILOVER true )"
}

// slotFailoverSQL reads whether a slot is a failover slot; the column is
// 17's. The walsender takes no parameters, hence the literal.
func slotFailoverSQL(name string) string {
	return "SELECT failover FROM pg_catalog.pg_replication_slots WHERE slot_name = " + pgquote.Literal(name)
}

// parseCreated reads CREATE_REPLICATION_SLOT's one row: slot_name,
// consistent_point, snapshot_name, output_plugin.
func parseCreated(results []*pgconn.Result) (pglogrepl.CreateReplicationSlotResult, error) {
	var r pglogrepl.CreateReplicationSlotResult
	if len(results) != 1 || len(results[0].Rows) != 1 || len(results[0].Rows[0]) != 4 {
		return r, errors.New("unexpected result: want one row of 4 columns")
	}
	row := results[0].Rows[0]
	r.SlotName, r.ConsistentPoint, r.SnapshotName, r.OutputPlugin = string(row[0]), string(row[1]), string(row[2]), string(row[3])
	return r, nil
}

// ensureFailover makes an existing slot a failover slot when this
// connection asks for one and did not create the slot itself (then it has
// FAILOVER already). A slot that is not there is left to START_REPLICATION
// to report.
func (c *Conn) ensureFailover(ctx context.Context, name string) error {
	if !c.failoverOn() || c.createdFailover {
		return nil
	}
	res, err := c.w.Run(ctx, slotFailoverSQL(name))
	if err != nil {
		return fmt.Errorf("read whether slot %q is a failover slot: %w", name, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 1 || string(res[0].Rows[0][0]) != "f" {
		return nil // a failover slot already, or no such slot
	}
	if _, err := c.w.Run(ctx, alterFailoverSQL(name)); err != nil {
		return fmt.Errorf("make slot %q a failover slot (RELAY_FAILOVER_SLOT): %w", name, err)
	}
	return nil
}
