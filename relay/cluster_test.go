package relay

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// pgCluster is a PostgreSQL primary with a streaming standby of the test's
// own, made by scripts/cluster.sh, for tests that change server settings
// the shared server must keep (synchronous_standby_names).
type pgCluster struct {
	t            *testing.T
	script, dir  string
	primary, sby int // ports
}

// startCluster brings the cluster up and removes it when the test ends. It
// fails the test, never skips it, when the cluster cannot start.
func startCluster(t *testing.T) *pgCluster {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("..", "scripts", "cluster.sh"))
	must(t, err)
	// Under /tmp, not t.TempDir(): the servers run as the postgres user,
	// which cannot enter a test's private temporary directory.
	ports := freePorts(t, 2)
	c := &pgCluster{t: t, script: script, primary: ports[0], sby: ports[1],
		dir: fmt.Sprintf("/tmp/outbox-relay-cluster-%d-%d", os.Getpid(), time.Now().UnixNano())}
	t.Cleanup(func() {
		if out, err := c.exec("pg-down"); err != nil {
			t.Errorf("scripts/cluster.sh pg-down %s: %v\n%s", c.dir, err, out)
		}
	})
	if out, err := c.exec("pg-up"); err != nil {
		t.Fatalf("scripts/cluster.sh pg-up could not start a primary and standby (the test needs them): %v\n%s", err, out)
	}
	return c
}

func (c *pgCluster) exec(sub string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", c.script, sub, c.dir)
	cmd.Env = append(os.Environ(), "PRIMARY_PORT="+strconv.Itoa(c.primary), "STANDBY_PORT="+strconv.Itoa(c.sby),
		"STANDBY_NAME=standby1")
	return cmd.CombinedOutput()
}

// run runs a cluster.sh subcommand or fails the test.
func (c *pgCluster) run(sub string) {
	c.t.Helper()
	if out, err := c.exec(sub); err != nil {
		c.t.Fatalf("scripts/cluster.sh %s: %v\n%s", sub, err, out)
	}
}

// url is the primary's URL for database db.
func (c *pgCluster) url(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.primary, db)
}

// sql runs statements on the primary's database db.
func (c *pgCluster) sql(db string, stmts ...string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.url(db))
	must(c.t, err)
	defer conn.Close(context.Background())
	for _, q := range stmts {
		if _, err := conn.Exec(ctx, q); err != nil {
			c.t.Fatalf("%s: %v", q, err)
		}
	}
}

// syncStates returns application_name -> sync_state from pg_stat_replication.
func (c *pgCluster) syncStates() map[string]string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.url("postgres"))
	must(c.t, err)
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `SELECT application_name, sync_state FROM pg_stat_replication`)
	must(c.t, err)
	out := map[string]string{}
	for rows.Next() {
		var name, state string
		must(c.t, rows.Scan(&name, &state))
		out[name] = state
	}
	must(c.t, rows.Err())
	return out
}

// freePorts returns n distinct ports free on 127.0.0.1 just now.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		must(t, err)
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// syncWorld is a cluster of our own with the test's outbox database (e)
// and another database, otherdb, with a table other_writes to commit to, and
// a pool on it: commits elsewhere in the cluster, which a synchronous
// standby gates too.
func syncWorld(t *testing.T) (*pgCluster, *env, *pgxpool.Pool) {
	t.Helper()
	c := startCluster(t)
	c.sql("postgres", `CREATE DATABASE outbox`, `CREATE DATABASE otherdb`)
	c.sql("otherdb", `CREATE TABLE other_writes (id bigserial PRIMARY KEY, v text)`)
	e := newEnvAt(t, c.url("outbox"))
	otherDB, err := pgxpool.New(context.Background(), c.url("otherdb"))
	must(t, err)
	t.Cleanup(otherDB.Close)
	return c, e, otherDB
}
