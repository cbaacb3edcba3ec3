package testenv

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

var validName = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func TestName(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		n := Name(t, "slot")
		if !validName.MatchString(n) {
			t.Fatalf("Name = %q, does not match %s", n, validName)
		}
		if !strings.HasPrefix(n, "slot_name_") {
			t.Fatalf("Name = %q, want prefix slot_name_", n)
		}
		if seen[n] {
			t.Fatalf("Name returned %q twice", n)
		}
		seen[n] = true
	}

	long := "With/Slashes, Spaces-and.Dots/" + strings.Repeat("VeryLongSubtestName", 10)
	t.Run(long, func(t *testing.T) {
		for _, prefix := range []string{"", "x", "Relay-Test!", strings.Repeat("p", 80)} {
			if n := Name(t, prefix); !validName.MatchString(n) {
				t.Errorf("Name(%q) = %q (len %d), does not match %s", prefix, n, len(n), validName)
			}
		}
	})
}

// TestCleanupDropsSlotsAndDatabase runs a subtest that leaves behind what a
// crashed relay test would: an active walsender on a slot from Slot, a second
// slot the harness was never told about, and an open connection. Once the
// subtest's cleanups have run, all of it must be gone.
func TestCleanupDropsSlotsAndDatabase(t *testing.T) {
	Integration(t)
	admin := adminURL(t)

	var db, slot, rawSlot string
	t.Run("inner", func(t *testing.T) {
		dbURL := Postgres(t)
		db = dbName(t, dbURL)

		// Registered first, so these run last, after the harness's drops.
		conn := connectT(t, dbURL)
		var repls []*pgconn.PgConn
		t.Cleanup(func() {
			conn.Close(context.Background())
			for _, r := range repls {
				r.Close(context.Background())
			}
		})
		mustExec(t, conn, `CREATE PUBLICATION testenv_pub FOR ALL TABLES`)

		slot = Slot(t, dbURL)
		mustExec(t, conn, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
		rawSlot = Name(t, "raw")
		mustExec(t, conn, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, rawSlot)

		active, lsn, exists := SlotState(t, dbURL, slot)
		if !exists || active || lsn == "" {
			t.Fatalf("SlotState after create = active %v, confirmed %q, exists %v; want inactive, an LSN, exists", active, lsn, exists)
		}

		// Walsenders streaming from both slots, still running when the
		// harness cleans up.
		for _, s := range []string{slot, rawSlot} {
			repls = append(repls, startReplication(t, dbURL, s))
			waitFor(t, "slot "+s+" to become active", func() bool {
				active, _, _ := SlotState(t, dbURL, s)
				return active
			})
		}
	})
	if db == "" {
		t.Fatal("inner test did not get a database")
	}

	conn := connectT(t, admin)
	defer conn.Close(context.Background())
	var dbs, slots int
	if err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_database WHERE datname = $1`, db).Scan(&dbs); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ($1, $2)`,
		slot, rawSlot).Scan(&slots); err != nil {
		t.Fatal(err)
	}
	if dbs != 0 || slots != 0 {
		t.Errorf("after cleanup: %d database(s) %s and %d of slots %s, %s remain; want none", dbs, db, slots, slot, rawSlot)
	}
	if _, _, exists := SlotState(t, admin, slot); exists {
		t.Errorf("SlotState(%s) says it still exists", slot)
	}
}

// TestSlotCleanupWithoutSlot: Slot's cleanup is a no-op when the test never
// created the slot.
func TestSlotCleanupWithoutSlot(t *testing.T) {
	Integration(t)
	dbURL := Postgres(t)
	t.Run("inner", func(t *testing.T) { Slot(t, dbURL) })
}

// TestFailsWithoutServices checks that a missing service fails the test with
// instructions instead of skipping it. It runs this test binary again with no
// URLs and an unreachable Docker engine.
func TestFailsWithoutServices(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		Postgres(t)
		return
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestFailsWithoutServices$", "-test.v")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, EnvDatabaseURL+"=") && !strings.HasPrefix(kv, EnvAMQPURL+"=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "TESTENV_CHILD=1", "DOCKER_HOST=unix:///nonexistent/docker.sock",
		"TESTCONTAINERS_RYUK_DISABLED=true")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("child passed without services; output:\n%s", out)
	}
	for _, want := range []string{"--- FAIL", EnvDatabaseURL + "=postgres://", "make test"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("child output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "--- SKIP") {
		t.Errorf("child skipped instead of failing:\n%s", out)
	}
}

func startReplication(t *testing.T, dbURL, slot string) *pgconn.PgConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	cfg, err := pgconn.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["replication"] = "database"
	repl, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("replication connection: %v", err)
	}
	err = pglogrepl.StartReplication(ctx, repl, slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'testenv_pub'"},
	})
	if err != nil {
		repl.Close(context.Background())
		t.Fatalf("START_REPLICATION: %v", err)
	}
	return repl
}

func connectT(t *testing.T, dbURL string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

func mustExec(t *testing.T, conn *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := conn.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func dbName(t *testing.T, dbURL string) string {
	t.Helper()
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	return cfg.Database
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
