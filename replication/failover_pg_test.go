package replication

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// lastCommand is the last command the walsender pid ran, as
// pg_stat_activity shows it (walsenders report each replication command).
func lastCommand(t *testing.T, admin *pgx.Conn, pid uint32) string {
	t.Helper()
	var q string
	if err := admin.QueryRow(t.Context(), `SELECT query FROM pg_stat_activity WHERE pid = $1`, int32(pid)).Scan(&q); err != nil {
		t.Fatalf("read pg_stat_activity of walsender %d: %v", pid, err)
	}
	return q
}

func replConn(t *testing.T, dbURL string, opts ...Option) *Conn {
	t.Helper()
	cfg, err := Config(dbURL, "outbox-relay-test")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Connect(t.Context(), cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// TestFailoverSlotBefore17 runs the relay's path on the real server, which
// here is PostgreSQL 15: with RELAY_FAILOVER_SLOT on, the slot is created
// with the very command pglogrepl sends (no FAILOVER), it is an ordinary
// slot, and Start streams from it without asking anything more.
func TestFailoverSlotBefore17(t *testing.T) {
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	ours, theirs := testenv.Slot(t, dbURL), testenv.Slot(t, dbURL)
	admin, err := pgx.Connect(t.Context(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	if _, err := admin.Exec(t.Context(), `CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t`); err != nil {
		t.Fatal(err)
	}

	c := replConn(t, dbURL, WithFailoverSlot(true))
	if major := c.ServerMajor(); FailoverSupported(major) {
		t.Fatalf("server is PostgreSQL %s: this test covers servers before %d; the 17 path is covered by TestCreateSlotCommandByVersion only",
			c.ServerVersion(), FailoverSince)
	}
	if _, err := c.IdentifySystem(t.Context()); err != nil {
		t.Fatal(err)
	}
	slot, err := c.CreateSlot(t.Context(), ours)
	if err != nil {
		t.Fatalf("CreateSlot with failover wanted on %s: %v", c.ServerVersion(), err)
	}
	if slot.ConsistentPoint == 0 || slot.Snapshot == "" {
		t.Errorf("slot %+v: want a consistent point and a snapshot", slot)
	}
	got := lastCommand(t, admin, c.PID())

	// What pglogrepl itself sends, on a connection of its own.
	p := replConn(t, dbURL)
	if _, err := pglogrepl.CreateReplicationSlot(t.Context(), p.pg, theirs, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"}); err != nil {
		t.Fatal(err)
	}
	want := strings.Replace(lastCommand(t, admin, p.PID()), theirs, ours, 1)
	if got != want || strings.Contains(strings.ToUpper(strings.Replace(got, ours, "", 1)), "FAILOVER") {
		t.Errorf("on %s the relay sent %q; want pglogrepl's command %q, without FAILOVER", c.ServerVersion(), got, want)
	}

	var plugin string
	var temporary bool
	if err := admin.QueryRow(t.Context(), `SELECT plugin, temporary FROM pg_replication_slots WHERE slot_name = $1`,
		ours).Scan(&plugin, &temporary); err != nil {
		t.Fatalf("slot %s: %v", ours, err)
	}
	if plugin != "pgoutput" || temporary {
		t.Errorf("slot %s: plugin %s temporary %v, want a permanent pgoutput slot", ours, plugin, temporary)
	}

	if err := c.Start(t.Context(), ours, "p", 0); err != nil {
		t.Fatalf("Start on %s with failover wanted: %v", c.ServerVersion(), err)
	}
	if q := lastCommand(t, admin, c.PID()); !strings.HasPrefix(q, "START_REPLICATION SLOT "+ours+" LOGICAL") {
		t.Errorf("last command %q, want START_REPLICATION", q)
	}
}

// TestFailoverCommandOn15 sends the 17 command to the real 15 server: its
// grammar (15 has the option list) takes the quoted name and the options,
// and only FAILOVER is unknown. So the text is well formed, and the version
// gate is what keeps it from servers before 17.
func TestFailoverCommandOn15(t *testing.T) {
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	name := testenv.Slot(t, dbURL)
	c := replConn(t, dbURL)
	if c.ServerMajor() != 15 {
		t.Fatalf("server is PostgreSQL %s: this test knows what 15 answers", c.ServerVersion())
	}
	_, err := c.w.Run(t.Context(), createSlotSQL(name, true))
	var pgErr *pgconn.PgError
	// 15 reports the option with a plain elog (XX000); a grammar error
	// would be 42601 "syntax error".
	if !errors.As(err, &pgErr) || pgErr.Code == pgerrcode.SyntaxError || pgErr.Message != "unrecognized option: failover" {
		t.Fatalf("the 17 command on 15 = %v; want unrecognized option: failover (the rest parsed)", err)
	}
	// Without FAILOVER the same form creates the slot: the quoting and the
	// option list are right.
	cmd := strings.Replace(createSlotSQL(name, true), ", FAILOVER true", "", 1)
	if _, err := c.w.Run(t.Context(), cmd); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	if _, _, exists := testenv.SlotState(t, dbURL, name); !exists {
		t.Errorf("%s created no slot %s", cmd, name)
	}
}
