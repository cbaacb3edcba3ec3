//go:build faults && cluster

package faulttest

// The RabbitMQ cluster tests: the relay on the three nodes of
// scripts/cluster.sh (hare1..3@localhost, AMQP 5681-5683) with
// RELAY_DEAD_LETTER_QUEUE_TYPE=quorum, the test's consumer on a quorum
// queue bound to the relay's exchange, a small load, and a node killed,
// stopped, two of three nodes down, or all restarted in turn. `make
// cluster-test` brings the cluster up, runs them and takes it down; run
// alone, each test runs `cluster.sh up` itself (idempotent).

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

var clusterPorts = []string{"5681", "5682", "5683"}

func clusterURLs() string {
	var urls []string
	for _, p := range clusterPorts {
		urls = append(urls, "amqp://guest:guest@127.0.0.1:"+p+"/")
	}
	return strings.Join(urls, ",")
}

// rabbitCluster runs scripts/cluster.sh.
type rabbitCluster struct {
	t      *testing.T
	script string
}

var clusterUpOnce struct {
	sync.Once
	err error
	out []byte
}

// upCluster brings the cluster up once per test binary, and at the end of
// each test starts any node the test left stopped.
func upCluster(t *testing.T) *rabbitCluster {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("..", "scripts", "cluster.sh"))
	must(t, err)
	c := &rabbitCluster{t: t, script: script}
	clusterUpOnce.Do(func() { clusterUpOnce.out, clusterUpOnce.err = c.exec("up") })
	if clusterUpOnce.err != nil {
		t.Fatalf("cluster.sh up: %v\n%s", clusterUpOnce.err, clusterUpOnce.out)
	}
	t.Cleanup(func() {
		for n := 1; n <= 3; n++ {
			if out, err := c.exec("rabbit-start", strconv.Itoa(n)); err != nil {
				t.Errorf("cleanup: cluster.sh rabbit-start %d: %v\n%s", n, err, out)
			}
		}
	})
	return c
}

func (c *rabbitCluster) exec(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	return exec.CommandContext(ctx, "bash", append([]string{c.script}, args...)...).CombinedOutput()
}

func (c *rabbitCluster) run(args ...string) {
	c.t.Helper()
	if out, err := c.exec(args...); err != nil {
		c.t.Fatalf("cluster.sh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (c *rabbitCluster) node(cmd string, n int) { c.t.Helper(); c.run(cmd, strconv.Itoa(n)) }

// leader is the number of the node holding quorum queue q's leader.
func (c *rabbitCluster) leader(q string) int {
	c.t.Helper()
	out, err := c.exec("rabbit-leader", q)
	if err != nil {
		c.t.Fatalf("cluster.sh rabbit-leader %s: %v\n%s", q, err, out)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil || n < 1 || n > 3 {
		c.t.Fatalf("cluster.sh rabbit-leader %s: %q", q, out)
	}
	return n
}

// clusterWorld is a world on the cluster: a quorum test queue and the
// relay configured for it.
type clusterWorld struct {
	*world
	c       *rabbitCluster
	order   *orderCheck
	metrics string     // the relay's RELAY_METRICS_ADDR
	dlqArgs amqp.Table // the relay's dead-letter queue's type
}

func newClusterWorld(t *testing.T) *clusterWorld {
	t.Helper()
	testenv.Integration(t)
	c := upCluster(t)
	w := newWorldOn(t, testenv.Postgres(t), clusterURLs(), amqp.Table{"x-queue-type": "quorum"})
	cw := &clusterWorld{world: w, c: c, order: &orderCheck{},
		metrics: fmt.Sprintf("127.0.0.1:%d", freePorts(t, 1)[0]), dlqArgs: amqp.Table{"x-queue-type": "quorum"}}
	w.env = append(w.env, "RELAY_DEAD_LETTER_QUEUE_TYPE=quorum", "RELAY_METRICS_ADDR="+cw.metrics)
	w.mu.Lock()
	w.onDelivery = cw.order.see
	w.mu.Unlock()
	return cw
}

// orderCheck checks per-aggregate order at the consumer, over the first
// delivery of each message. Two reorderings are allowed, and counted:
//   - the broker's: a quorum queue gives the unacknowledged messages of a
//     consumer whose node went away back after messages published later,
//     with redelivered set (/work/shared/CLUSTERS.md);
//   - the relay's documented one (README, "Delivery guarantees"): an event
//     the broker nacks is republished after the events already published
//     behind it. The nacked ids come from the relay's log.
//
// Any other first delivery must come after the earlier events of its
// aggregate.
type orderCheck struct {
	firsts []firstDelivery
}

type firstDelivery struct {
	id, agg     string
	seq         int64
	redelivered bool
}

// see runs under world.mu.
func (o *orderCheck) see(d amqp.Delivery, first bool) {
	if !first {
		return
	}
	agg, _ := d.Headers["aggregate_id"].(string)
	var body struct {
		Seq int64 `json:"seq"`
	}
	if json.Unmarshal(d.Body, &body) != nil {
		body.Seq = -1
	}
	o.firsts = append(o.firsts, firstDelivery{id: d.MessageId, agg: agg, seq: body.Seq, redelivered: d.Redelivered})
}

var nackedID = regexp.MustCompile(`"id":"([0-9a-f-]{36})"[^\n]*"message":"broker nacked the event`)

// checkOrder fails the test on an inversion that neither the broker nor
// the relay's nack rule explains, and says how many of each there were.
func (cw *clusterWorld) checkOrder(p *relayProc) string {
	cw.t.Helper()
	nacked := map[string]bool{}
	for _, m := range nackedID.FindAllStringSubmatch(p.out.String(), -1) {
		nacked[m[1]] = true
	}
	cw.mu.Lock()
	defer cw.mu.Unlock()
	last := map[string]int64{}
	var inversions []string
	redelivered, republished := 0, 0
	for _, d := range cw.order.firsts {
		if d.agg == "" || d.seq < 0 {
			inversions = append(inversions, d.id+": unreadable")
			continue
		}
		if l, ok := last[d.agg]; ok && d.seq < l {
			switch {
			case d.redelivered:
				redelivered++
			case nacked[d.id]:
				republished++
			default:
				inversions = append(inversions, fmt.Sprintf("aggregate %s: seq %d after %d", d.agg, d.seq, l))
			}
			continue
		}
		last[d.agg] = d.seq
	}
	if n := len(inversions); n > 0 {
		cw.t.Errorf("%d per-aggregate order inversions neither redelivered nor nacked, e.g. %v", n, inversions[:min(n, 5)])
	}
	restarts := strings.Count(p.out.String(), "the broker nacked the event every time")
	return fmt.Sprintf("%d nacked (once each or more) by the broker and republished, %d sessions ended on %d nacks in a row; order: %d first deliveries out of order "+
		"redelivered by the broker, %d republished after a nack, %d others", len(nacked), restarts, 5, redelivered, republished, len(inversions))
}

// produceOrdered inserts 1-3 events per transaction, every interval, for
// 16 aggregates, each payload {"seq": n} with n rising in commit order
// (one producer, one transaction at a time); one transaction in seven
// rolls back.
func (cw *clusterWorld) produceOrdered(every time.Duration) *producer {
	p := &producer{stop: make(chan struct{}), done: make(chan struct{})}
	var aggs []string
	for i := 0; i < 16; i++ {
		aggs = append(aggs, fmt.Sprintf("00000000-0000-4000-8000-%012d", i))
	}
	go func() {
		defer close(p.done)
		ctx := context.Background()
		var seq int64
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
			size := 1 + i%3
			var a []string
			var s []int64
			for k := 0; k < size; k++ {
				seq++
				a, s = append(a, aggs[(i*7+k*3)%len(aggs)]), append(s, seq)
			}
			tx, err := cw.pool.Begin(ctx)
			if err != nil {
				continue
			}
			_, err = tx.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
				SELECT gen_random_uuid(), 'order', t.a::uuid, 'created', jsonb_build_object('seq', t.s)
				FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS t(a, s, o) ORDER BY t.o`, a, s)
			if err != nil || i%7 == 3 {
				_ = tx.Rollback(ctx)
				continue
			}
			if tx.Commit(ctx) == nil {
				p.n.Add(int64(size))
			}
		}
	}()
	return p
}

// dbNow is the database server's clock (the clock of occurred_at and
// published_at).
func (cw *clusterWorld) dbNow() time.Time {
	cw.t.Helper()
	var now time.Time
	must(cw.t, cw.pool.QueryRow(context.Background(), `SELECT clock_timestamp()`).Scan(&now))
	return now
}

// recovery is the time from t0 to the first event committed after t0
// being confirmed and marked.
func (cw *clusterWorld) recovery(t0 time.Time) time.Duration {
	cw.t.Helper()
	return cw.recoverySince(t0, t0)
}

var connectedNode = regexp.MustCompile(`"node":"127\.0\.0\.1:(\d+)"[^\n]*"message":"connected to RabbitMQ node"`)

// relayNode is the node (1-3) of the relay's last "connected to RabbitMQ
// node" line, and how many such lines it has logged.
func relayNode(p *relayProc) (node, connections int) {
	m := connectedNode.FindAllStringSubmatch(p.out.String(), -1)
	if len(m) == 0 {
		return 0, 0
	}
	port := m[len(m)-1][1]
	for i, cp := range clusterPorts {
		if cp == port {
			node = i + 1
		}
	}
	return node, len(m)
}

// nodeMetrics reads outbox_relay_amqp_node and
// outbox_relay_amqp_connections_total by node (1-3).
func (cw *clusterWorld) nodeMetrics() (gauge, conns [4]float64) {
	cw.t.Helper()
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + cw.metrics + "/metrics")
	must(cw.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	must(cw.t, err)
	for _, line := range strings.Split(string(b), "\n") {
		for i, port := range clusterPorts {
			for name, into := range map[string]*[4]float64{"outbox_relay_amqp_node": &gauge, "outbox_relay_amqp_connections_total": &conns} {
				if v, ok := strings.CutPrefix(line, name+`{node="127.0.0.1:`+port+`"} `); ok {
					f, err := strconv.ParseFloat(v, 64)
					must(cw.t, err)
					into[i+1] = f
				}
			}
		}
		if strings.Contains(line, "guest") {
			cw.t.Errorf("a metric line holds a credential: %s", line)
		}
	}
	return gauge, conns
}

// start runs the relay and waits until events flow through the cluster.
func (cw *clusterWorld) start(extra ...string) (*relayProc, *producer) {
	cw.t.Helper()
	p := cw.startRelay(extra...)
	prod := cw.produceOrdered(5 * time.Millisecond)
	cw.waitFor(60*time.Second, "events through the cluster", func() bool { return cw.received() > 100 })
	return p, prod
}

// finish stops the load, checks that every row was delivered and marked,
// nothing dead-lettered and the order, and returns the counts.
func (cw *clusterWorld) finish(p *relayProc, prod *producer) (events, lost, dups int, order string) {
	cw.t.Helper()
	time.Sleep(2 * time.Second) // load after the recovery
	prod.halt()
	events, lost, dups = cw.verify(90 * time.Second)
	if !p.alive() {
		cw.t.Fatal("the relay exited")
	}
	if n := cw.deadLettered(); n != 0 {
		cw.t.Errorf("%d events dead-lettered", n)
	}
	return events, lost, dups, cw.checkOrder(p)
}

func (cw *clusterWorld) deadLettered() int {
	cw.t.Helper()
	conn, err := cw.dialAny()
	must(cw.t, err)
	defer conn.Close()
	ch, err := conn.Channel()
	must(cw.t, err)
	q, err := ch.QueueDeclarePassive(cw.dlx, true, false, false, false, cw.dlqArgs)
	must(cw.t, err)
	return q.Messages
}

func others(n int) []int {
	var o []int
	for i := 1; i <= 3; i++ {
		if i != n {
			o = append(o, i)
		}
	}
	return o
}

// TestClusterRabbitMQKillConnectedNode: kill -9 the node the relay is
// connected to (its log line and outbox_relay_amqp_node agree on which);
// the relay moves to another node, republishes what was unconfirmed, and
// the node comes back.
func TestClusterRabbitMQKillConnectedNode(t *testing.T) {
	cw := newClusterWorld(t)
	p, prod := cw.start()
	time.Sleep(2 * time.Second)
	node, conns := relayNode(p)
	if node == 0 {
		t.Fatal("the relay logged no connected node")
	}
	if g, _ := cw.nodeMetrics(); g[node] != 1 || g[others(node)[0]] != 0 || g[others(node)[1]] != 0 {
		t.Fatalf("outbox_relay_amqp_node %v, the relay logged node %d", g[1:], node)
	}
	t0 := cw.dbNow()
	cw.c.node("rabbit-kill", node)
	cw.waitFor(60*time.Second, "the relay on another node", func() bool {
		n, c := relayNode(p)
		return c > conns && n != node
	})
	moved, _ := relayNode(p)
	cw.waitFor(10*time.Second, "outbox_relay_amqp_node to follow", func() bool {
		g, _ := cw.nodeMetrics()
		return g[moved] == 1 && g[node] == 0
	})
	time.Sleep(2 * time.Second)
	cw.c.node("rabbit-start", node)
	events, lost, dups, order := cw.finish(p, prod)
	_, c := cw.nodeMetrics()
	if c[moved] < 1 {
		t.Errorf("outbox_relay_amqp_connections_total for node %d = %v", moved, c[moved])
	}
	t.Logf("kill -9 of hare%d (the relay's node; it moved to hare%d): %d events, %d lost, %d duplicated; %s; "+
		"recovered %s after the kill (first event committed after it confirmed and marked)",
		node, moved, events, lost, dups, order, cw.recovery(t0))
}

// TestClusterRabbitMQStopLeaderNode: stop the node holding the quorum
// queue's leader; a new leader is elected and the relay goes on (moving
// nodes too when it was on that one); the node comes back.
func TestClusterRabbitMQStopLeaderNode(t *testing.T) {
	cw := newClusterWorld(t)
	p, prod := cw.start()
	time.Sleep(2 * time.Second)
	leader := cw.c.leader(cw.queue)
	relayOn, _ := relayNode(p)
	t0 := cw.dbNow()
	cw.c.node("rabbit-stop", leader)
	newLeader := cw.c.leader(cw.queue)
	if newLeader == leader {
		t.Fatalf("hare%d is stopped and still the leader", leader)
	}
	time.Sleep(4 * time.Second)
	cw.c.node("rabbit-start", leader)
	events, lost, dups, order := cw.finish(p, prod)
	t.Logf("stop of hare%d (the queue's leader; the relay was on hare%d; new leader hare%d): %d events, %d lost, %d duplicated; "+
		"%s; recovered %s after the stop (first event committed after it confirmed and marked)",
		leader, relayOn, newLeader, events, lost, dups, order, cw.recovery(t0))
}

// TestClusterRabbitMQNoMajority: stop the two nodes the relay is not on,
// so the quorum queue has no majority. RabbitMQ then confirms nothing (no
// ack, no nack) until a majority is back: the relay holds, marks no event
// committed meanwhile, acknowledges no LSN past the outage, dead-letters
// nothing, and goes on once a node is back.
//
// stop: the two nodes the relay is not on stop cleanly, and the relay's
// connection stays up. kill: kill -9 of the node with the queue's leader
// and of the relay's (another if it is the same): the relay moves to the
// last node and publishes to a queue without a leader, which RabbitMQ may
// nack; none of it may be dead-lettered.
func TestClusterRabbitMQNoMajority(t *testing.T) {
	t.Run("stop", func(t *testing.T) { noMajority(t, "rabbit-stop") })
	t.Run("kill", func(t *testing.T) { noMajority(t, "rabbit-kill") })
}

func noMajority(t *testing.T, how string) {
	cw := newClusterWorld(t)
	p, prod := cw.start()
	time.Sleep(2 * time.Second)
	relayOn, _ := relayNode(p)
	down := others(relayOn)
	if how == "rabbit-kill" {
		leader := cw.c.leader(cw.queue)
		down = []int{leader, relayOn}
		if relayOn == leader {
			down[1] = others(leader)[0]
		}
	}
	cw.c.node(how, down[0])
	cw.c.node(how, down[1])
	tDown := cw.dbNow()
	// After a second, whatever the relay had in flight when the majority
	// went is long resolved or held; events committed after tDown are held.
	time.Sleep(time.Second)
	var after string
	must(t, cw.pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()::text`).Scan(&after))
	ctx := context.Background()
	end := time.Now().Add(6 * time.Second)
	var held int
	for time.Now().Before(end) {
		if c := cw.slotConfirmed(); c == "" || !cw.lsnLess(c, after) {
			t.Fatalf("slot acknowledged %q, at or past %s (written a second into the outage)", c, after)
		}
		var marked int
		must(t, cw.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE published_at IS NOT NULL), count(*) FILTER (WHERE published_at IS NULL)
			FROM outbox_events WHERE occurred_at > $1`, tDown).Scan(&marked, &held))
		if marked != 0 {
			t.Fatalf("%d events committed without a majority were marked", marked)
		}
		if !p.alive() {
			t.Fatal("the relay exited without a majority")
		}
		time.Sleep(250 * time.Millisecond)
	}
	if held == 0 {
		t.Fatal("no event was committed during the outage; the test shows nothing")
	}
	ready := readyz(cw.metrics)
	tStart := cw.dbNow()
	cw.c.node("rabbit-start", down[0])
	tUp := cw.dbNow()
	var first *time.Time
	cw.waitFor(60*time.Second, "a held event confirmed", func() bool {
		must(t, cw.pool.QueryRow(ctx, `SELECT min(published_at) FROM outbox_events WHERE occurred_at > $1`, tDown).Scan(&first))
		return first != nil
	})
	cw.c.node("rabbit-start", down[1])
	events, lost, dups, order := cw.finish(p, prod)
	t.Logf("%s of hare%d and hare%d (no majority; the relay on hare%d) for %s: %d events held unmarked, none acknowledged; "+
		"%d events, %d lost, %d duplicated; %s; first held event confirmed and marked %s after hare%d's start began "+
		"(%s after cluster.sh rabbit-start returned, which polls the node every 0.5 s); /readyz %d during the outage",
		how, down[0], down[1], relayOn, tStart.Sub(tDown).Round(100*time.Millisecond), held, events, lost, dups, order,
		first.Sub(tStart).Round(time.Millisecond), down[0], first.Sub(tUp).Round(time.Millisecond), ready)
}

// TestClusterRabbitMQRollingRestart: stop and start each node in turn, as
// an upgrade does.
func TestClusterRabbitMQRollingRestart(t *testing.T) {
	cw := newClusterWorld(t)
	p, prod := cw.start()
	time.Sleep(2 * time.Second)
	var worst time.Duration
	var steps []string
	for n := 1; n <= 3; n++ {
		on, _ := relayNode(p)
		t0 := cw.dbNow()
		cw.c.node("rabbit-stop", n)
		time.Sleep(2 * time.Second)
		cw.c.node("rabbit-start", n)
		time.Sleep(2 * time.Second)
		r := cw.recovery(t0)
		worst = max(worst, r)
		steps = append(steps, fmt.Sprintf("hare%d (relay on hare%d) %s", n, on, r))
	}
	_, c := cw.nodeMetrics()
	events, lost, dups, order := cw.finish(p, prod)
	t.Logf("rolling restart of hare1..3: %d events, %d lost, %d duplicated; %s; %d connections; "+
		"recovered at worst %s after a stop (first event committed after it confirmed and marked): %s",
		events, lost, dups, order, int(c[1]+c[2]+c[3]), worst, strings.Join(steps, ", "))
}

// TestClusterRabbitMQClassicDeadLetterQueueNodeDown: with the default
// classic dead-letter queue, declared on the node the relay first connects
// to, kill that node: every session on the other nodes fails at the
// queue's declare (NOT_FOUND, its home node is down), so nothing is
// published until the node is back; the error names the cause and
// RELAY_DEAD_LETTER_QUEUE_TYPE=quorum. Once the node is back the relay
// goes on and loses nothing.
func TestClusterRabbitMQClassicDeadLetterQueueNodeDown(t *testing.T) {
	cw := newClusterWorld(t)
	cw.dlqArgs = nil
	p, prod := cw.start("RELAY_DEAD_LETTER_QUEUE_TYPE=classic")
	home, _ := relayNode(p)
	time.Sleep(time.Second)
	tDown := cw.dbNow()
	cw.c.node("rabbit-kill", home)
	const hint = "a classic queue lives on one node"
	cw.waitFor(60*time.Second, "the declare's error naming the setting", func() bool {
		return strings.Contains(p.out.String(), hint)
	})
	time.Sleep(3 * time.Second) // it stays stalled
	var marked int
	must(t, cw.pool.QueryRow(context.Background(),
		`SELECT count(*) FROM outbox_events WHERE occurred_at > $1 AND published_at IS NOT NULL`, tDown.Add(time.Second)).Scan(&marked))
	if marked != 0 {
		t.Errorf("%d events committed a second after the dead-letter queue's node went were marked", marked)
	}
	line := ""
	for _, l := range strings.Split(p.out.String(), "\n") {
		if strings.Contains(l, hint) {
			line = l
			break
		}
	}
	for _, want := range []string{"RELAY_DEAD_LETTER_QUEUE_TYPE=quorum", cw.dlx, "NOT_FOUND"} {
		if !strings.Contains(line, want) {
			t.Errorf("the error does not say %q: %s", want, line)
		}
	}
	if strings.Contains(line, "guest:guest") {
		t.Errorf("the error holds a password: %s", line)
	}
	tStart := cw.dbNow()
	cw.c.node("rabbit-start", home)
	tUp := cw.dbNow()
	events, lost, dups, order := cw.finish(p, prod)
	t.Logf("the relay's error while hare%d was down: %s", home, line)
	t.Logf("kill -9 of hare%d, home of the classic dead-letter queue: no session could declare it, nothing marked in the %s it was down; "+
		"%d events, %d lost, %d duplicated; %s; first event committed a second or more into the outage confirmed and marked "+
		"%s after hare%d's start began (the start took %s: the node answered within it)",
		home, tStart.Sub(tDown).Round(100*time.Millisecond), events, lost, dups, order,
		cw.recoverySince(tDown.Add(time.Second), tStart), home, tUp.Sub(tStart).Round(time.Millisecond))
}

// recoverySince is the time from t0 to the first event committed after
// committed being confirmed and marked.
func (cw *clusterWorld) recoverySince(committed, t0 time.Time) time.Duration {
	cw.t.Helper()
	var first *time.Time
	must(cw.t, cw.pool.QueryRow(context.Background(),
		`SELECT min(published_at) FROM outbox_events WHERE occurred_at > $1`, committed).Scan(&first))
	if first == nil {
		cw.t.Fatalf("no event committed after %s was ever marked", committed.Format(time.RFC3339Nano))
	}
	return first.Sub(t0).Round(time.Millisecond)
}
