//go:build faults && cluster

package faulttest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"
)

// The cluster tests run against scripts/cluster.sh up's topology (make
// cluster-test brings it up and removes it). The PostgreSQL pair is under
// $CLUSTER_DIR/pg, or OUTBOX_CLUSTER_PG_DIR for a pair of one's own
// (SYNC=on scripts/cluster.sh pg-up DIR).

// pgPair is the synchronous primary/standby pair of cluster.sh.
type pgPair struct {
	t       *testing.T
	script  string
	dir     string
	primary string // host:port of the node named primary
	standby string // host:port of the node named standby
}

func clusterPG(t *testing.T) *pgPair {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("..", "scripts", "cluster.sh"))
	must(t, err)
	dir := os.Getenv("OUTBOX_CLUSTER_PG_DIR")
	if dir == "" {
		base := os.Getenv("CLUSTER_DIR")
		if base == "" {
			base = "/tmp/outbox-relay-clusters"
		}
		dir = filepath.Join(base, "pg")
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("the cluster tests need scripts/cluster.sh up (or OUTBOX_CLUSTER_PG_DIR): %v", err)
		}
		return strings.TrimSpace(string(b))
	}
	p := &pgPair{t: t, script: script, dir: dir,
		primary: "127.0.0.1:" + read("primary.port"), standby: "127.0.0.1:" + read("standby.port")}
	if _, err := os.Stat(filepath.Join(dir, "sync")); err != nil {
		t.Fatalf("the pair under %s has no synchronous standby (cluster.sh up, or SYNC=on pg-up): %v", dir, err)
	}
	return p
}

func (p *pgPair) run(sub string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "bash", p.script, sub, p.dir).CombinedOutput()
	if err != nil {
		p.t.Fatalf("scripts/cluster.sh %s %s: %v\n%s", sub, p.dir, err, out)
	}
}

// url is the multi-host URL a failover manager's clients use.
func (p *pgPair) url(db string) string {
	return fmt.Sprintf("postgres://postgres@%s,%s/%s?sslmode=disable&target_session_attrs=read-write", p.primary, p.standby, db)
}

// ordered is a consumer of its own on the test's exchange that keeps the
// order of first deliveries per aggregate.
type ordered struct {
	mu     sync.Mutex
	seen   map[string]bool
	last   map[string]int64 // aggregate -> seq of its last first delivery
	errors []string
}

func (w *world) consumeOrdered() *ordered {
	o := &ordered{seen: map[string]bool{}, last: map[string]int64{}}
	c, err := amqp.Dial(w.amqpURL)
	must(w.t, err)
	w.t.Cleanup(func() { c.Close() })
	ch, err := c.Channel()
	must(w.t, err)
	must(w.t, ch.ExchangeDeclare(w.exchange, "topic", true, false, false, false, nil))
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(w.t, err)
	must(w.t, ch.QueueBind(q.Name, "#", w.exchange, false, nil))
	ds, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	must(w.t, err)
	go func() {
		for d := range ds {
			var body struct{ Seq int64 }
			if json.Unmarshal(d.Body, &body) != nil {
				continue
			}
			agg, _ := d.Headers["aggregate_id"].(string)
			o.mu.Lock()
			if !o.seen[d.MessageId] {
				o.seen[d.MessageId] = true
				if prev, ok := o.last[agg]; ok && body.Seq < prev {
					o.errors = append(o.errors, fmt.Sprintf("aggregate %s: seq %d after %d", agg, body.Seq, prev))
				}
				if body.Seq > o.last[agg] {
					o.last[agg] = body.Seq
				}
			}
			o.mu.Unlock()
		}
	}()
	return o
}

func (o *ordered) check(t *testing.T) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.errors) > 0 {
		t.Fatalf("per-aggregate order broken (%d times), first: %s", len(o.errors), strings.Join(o.errors[:min(5, len(o.errors))], "; "))
	}
}

// seqProducer commits one event per transaction from one goroutine, on 8
// aggregates, with an increasing seq: commit order is seq order.
type seqProducer struct {
	stop, done chan struct{}
	seq, ok    atomic.Int64
	lastErr    atomic.Value
}

// produceSeq's seqs start after from.
func (w *world) produceSeq(every time.Duration, from int64) *seqProducer {
	p := &seqProducer{stop: make(chan struct{}), done: make(chan struct{})}
	p.seq.Store(from)
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
			n := p.seq.Add(1)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := w.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
				VALUES (gen_random_uuid(), 'order', ('00000000-0000-0000-0000-00000000000' || ($1::bigint % 8))::uuid, 'created', jsonb_build_object('seq', $1::bigint))`, n)
			cancel()
			if err == nil {
				p.ok.Add(1)
			} else {
				p.lastErr.Store(err.Error())
			}
		}
	}()
	return p
}

func (p *seqProducer) halt() {
	close(p.stop)
	<-p.done
}

// TestClusterPostgreSQLFailoverAndFailback: the relay runs on the
// multi-host URL; under load the primary dies (-m immediate) and the
// standby is promoted. The relay finds the new primary, finds no slot
// there (PostgreSQL 15 has no failover slots), creates it, sweeps and
// streams. Every row the new primary has is delivered and marked, no
// message is received for a row it does not have (the synchronous
// standby's wait, RELAY_WAIT_FOR_SYNC_STANDBY), and order per aggregate
// holds. Then the old primary comes back as a standby and the same is
// done the other way.
func TestClusterPostgreSQLFailoverAndFailback(t *testing.T) {
	p := clusterPG(t)
	db := fmt.Sprintf("failover_%d", time.Now().UnixNano())
	admin := func(q string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, p.url("postgres"))
		must(t, err)
		defer conn.Close(context.Background())
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	admin(`CREATE DATABASE ` + db)
	t.Cleanup(func() { admin(`DROP DATABASE IF EXISTS ` + db + ` WITH (FORCE)`) })
	// pgx tries the next host of a URL on most errors, but not on "database
	// does not exist": wait until the standby has replayed the CREATE.
	for _, node := range []string{p.primary, p.standby} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			conn, err := pgx.Connect(context.Background(), fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", node, db))
			if err == nil {
				conn.Close(context.Background())
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("database %s on %s: %v", db, node, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	w := newWorldAt(t, p.url(db))
	o := w.consumeOrdered()
	relay := w.startRelay()
	w.waitFor(60*time.Second, "the relay to create its slot", func() bool { return w.slotConfirmed() != "" })

	dupsBefore, eventsBefore, seq := 0, 0, int64(0)
	phase := func(name string) {
		from := seq
		prod := w.produceSeq(3*time.Millisecond, from)
		time.Sleep(4 * time.Second)
		crashed := time.Now()
		p.run("pg-crash")
		p.run("pg-promote")
		promoted := time.Since(crashed)
		// The first event committed on the new primary, delivered.
		var first time.Duration
		w.waitFor(90*time.Second, "an event committed on the new primary to be delivered", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			rows, err := w.pool.Query(ctx, `SELECT id::text FROM outbox_events WHERE occurred_at > $1 ORDER BY occurred_at LIMIT 50`, crashed)
			if err != nil {
				return false
			}
			ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				return false
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			for _, id := range ids {
				if w.seen[id] > 0 {
					first = time.Since(crashed)
					return true
				}
			}
			return false
		})
		time.Sleep(3 * time.Second)
		prod.halt()
		seq = prod.seq.Load()
		if 2*prod.ok.Load() < seq-from {
			t.Fatalf("%s: only %d of %d commits succeeded; last error: %v", name, prod.ok.Load(), seq-from, prod.lastErr.Load())
		}
		events, lost, dups := w.verify(120 * time.Second)
		o.check(t)
		if !relay.alive() {
			t.Fatalf("%s: the relay exited", name)
		}
		t.Logf("%s: %d events, %d lost, %d duplicated; promotion took %s; first event committed on the new primary delivered %s after the crash",
			name, events-eventsBefore, lost, dups-dupsBefore, promoted.Round(10*time.Millisecond), first.Round(10*time.Millisecond))
		dupsBefore, eventsBefore = dups, events
	}
	phase("failover")
	p.run("pg-rejoin") // the old primary, a synchronous standby of the new one
	phase("failback")
	p.run("pg-rejoin") // both nodes as they were
	if code := relay.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d after SIGTERM", code)
	}
}
