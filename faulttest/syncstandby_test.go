//go:build faults

package faulttest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// cluster is a primary and a streaming standby of the test's own
// (scripts/cluster.sh), removed when the test ends.
type cluster struct {
	t                 *testing.T
	script, dir       string
	primary, standbyP int
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("..", "scripts", "cluster.sh"))
	must(t, err)
	ports := freePorts(t, 2)
	c := &cluster{t: t, script: script, primary: ports[0], standbyP: ports[1],
		dir: fmt.Sprintf("/tmp/outbox-relay-cluster-%d-%d", os.Getpid(), time.Now().UnixNano())}
	t.Cleanup(func() {
		if out, err := c.exec("pg-down"); err != nil {
			t.Errorf("scripts/cluster.sh pg-down: %v\n%s", err, out)
		}
	})
	c.run("pg-up")
	return c
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

func (c *cluster) exec(sub string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", c.script, sub, c.dir)
	cmd.Env = append(os.Environ(), "PRIMARY_PORT="+strconv.Itoa(c.primary), "STANDBY_PORT="+strconv.Itoa(c.standbyP))
	return cmd.CombinedOutput()
}

func (c *cluster) run(sub string) {
	c.t.Helper()
	if out, err := c.exec(sub); err != nil {
		c.t.Fatalf("scripts/cluster.sh %s (the test needs its own primary and standby): %v\n%s", sub, err, out)
	}
}

func (c *cluster) url(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.primary, db)
}

func (c *cluster) sql(db string, stmts ...string) {
	c.t.Helper()
	conn, err := pgx.Connect(context.Background(), c.url(db))
	must(c.t, err)
	defer conn.Close(context.Background())
	for _, q := range stmts {
		if _, err := conn.Exec(context.Background(), q); err != nil {
			c.t.Fatalf("%s: %v", q, err)
		}
	}
}

// states returns application_name -> state/sync_state from pg_stat_replication.
func (c *cluster) states() map[string]string {
	c.t.Helper()
	conn, err := pgx.Connect(context.Background(), c.url("postgres"))
	must(c.t, err)
	defer conn.Close(context.Background())
	rows, err := conn.Query(context.Background(), `SELECT application_name, state || '/' || sync_state FROM pg_stat_replication`)
	must(c.t, err)
	out := map[string]string{}
	for rows.Next() {
		var k, v string
		must(c.t, rows.Scan(&k, &v))
		out[k] = v
	}
	return out
}

// TestSIGKILLAsSynchronousStandby: with synchronous_standby_names = '*' the
// relay is the synchronous standby, so every outbox commit waits for it and
// the relay acknowledges through outbox_relay_confirmed. SIGKILL it again
// and again under load: commits never stall for long (the physical standby
// takes the role while the relay is gone), nothing committed is lost, every
// row is marked, no record is left, and duplicates come only from what was
// in flight at each kill.
func TestSIGKILLAsSynchronousStandby(t *testing.T) {
	c := startCluster(t)
	c.sql("postgres", `CREATE DATABASE outbox`)
	w := newWorldAt(t, c.url("outbox"))
	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = '*'`, `SELECT pg_reload_conf()`)

	// Give the relay the lower walsender slot.
	c.run("standby-stop")
	p := w.startRelay()
	w.waitFor(30*time.Second, "the relay to stream", func() bool { return c.states()["outbox-relay"] == "streaming/sync" })
	c.run("standby-start")
	w.waitFor(30*time.Second, "standby1 potential", func() bool { return c.states()["standby1"] == "streaming/potential" })

	prod := w.produce(2 * time.Millisecond)
	for round := 0; round < 5; round++ {
		before := prod.n.Load()
		time.Sleep(time.Duration(1000+rand.IntN(1500)) * time.Millisecond)
		if s := c.states(); s["outbox-relay"] != "streaming/sync" {
			t.Logf("round %d: pg_stat_replication %v", round, s)
		}
		p.kill(t)
		if after := prod.n.Load(); after == before {
			t.Fatalf("round %d: no outbox commit completed while the relay was the synchronous standby", round)
		}
		p = w.startRelay()
	}
	time.Sleep(time.Second)
	prod.halt()
	events, lost, dups := w.verify(90 * time.Second)
	var records int
	w.waitFor(30*time.Second, "no record left in outbox_relay_confirmed", func() bool {
		must(t, w.pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_relay_confirmed`).Scan(&records))
		return records == 0
	})
	t.Logf("SIGKILL x5 as synchronous standby: %d events, %d lost, %d duplicated", events, lost, dups)
	// Leave the cluster writable for the cleanups.
	c.sql("postgres", `ALTER SYSTEM SET synchronous_standby_names = ''`, `SELECT pg_reload_conf()`)
	if code := p.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d after SIGTERM", code)
	}
}
