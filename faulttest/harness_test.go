//go:build faults

package faulttest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "outbox-relay-faults")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "outbox-relay")
	build := exec.Command("go", "build", "-race", "-o", binary, "../cmd/outbox-relay")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build outbox-relay:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// world is one fault test's database, slot, exchanges and durable queue.
type world struct {
	t        *testing.T
	dbURL    string // direct
	amqpURL  string // direct
	pool     *pgxpool.Pool
	slot     string
	exchange string
	dlx      string
	queue    string
	env      []string   // RELAY_* for the relay
	qargs    amqp.Table // the test queue's arguments (x-queue-type)

	mu   sync.Mutex
	seen map[string]int // message id -> first deliveries (redeliveries not counted)
	// onDelivery, when set, sees every delivery under mu: first is whether
	// it is the first sighting of its message id.
	onDelivery func(d amqp.Delivery, first bool)
	total      atomic.Int64
}

func newWorld(t *testing.T) *world {
	t.Helper()
	testenv.Integration(t)
	return newWorldAt(t, testenv.Postgres(t))
}

// newWorldAt is newWorld on a database the test provides (a cluster of its
// own).
func newWorldAt(t *testing.T, dbURL string) *world {
	t.Helper()
	return newWorldOn(t, dbURL, testenv.AMQP(t), nil)
}

// newWorldOn is newWorldAt on RabbitMQ nodes of the test's own (amqpURL
// may list several, comma-separated: see dialAny), with a test queue
// declared with qargs.
func newWorldOn(t *testing.T, dbURL, amqpURL string, qargs amqp.Table) *world {
	t.Helper()
	w := &world{t: t, dbURL: dbURL, amqpURL: amqpURL, qargs: qargs, seen: map[string]int{}}
	w.slot = testenv.Slot(t, w.dbURL)
	w.exchange, w.dlx, w.queue = testenv.Name(t, "ex"), testenv.Name(t, "dlx"), testenv.Name(t, "q")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, w.dbURL)
	must(t, err)
	_, err = migrations.Apply(ctx, conn, migrations.Target{Schema: "public", Table: "outbox_events", Publication: "outbox_relay_pub"})
	must(t, err)
	conn.Close(ctx)
	w.pool, err = pgxpool.New(ctx, w.dbURL)
	must(t, err)
	t.Cleanup(w.pool.Close)
	_, err = w.pool.Exec(ctx, `CREATE TABLE other (id bigserial PRIMARY KEY, v text)`)
	must(t, err)
	w.env = []string{
		"RELAY_DATABASE_URL=" + w.dbURL,
		"RELAY_AMQP_URL=" + w.amqpURL,
		"RELAY_SLOT=" + w.slot,
		"RELAY_EXCHANGE=" + w.exchange,
		"RELAY_DEAD_LETTER_EXCHANGE=" + w.dlx,
		"RELAY_METRICS_ADDR=",
		"RELAY_LOG_FORMAT=json",
		"RELAY_STATUS_INTERVAL=200ms",
		"RELAY_BACKOFF_MIN=100ms",
		"RELAY_BACKOFF_MAX=2s",
	}
	t.Cleanup(func() {
		if c, err := w.dialAny(); err == nil {
			if ch, err := c.Channel(); err == nil {
				_, _ = ch.QueueDelete(w.queue, false, false, false)
				_, _ = ch.QueueDelete(w.dlx, false, false, false)
				_ = ch.ExchangeDelete(w.exchange, false, false)
				_ = ch.ExchangeDelete(w.dlx, false, false)
			}
			c.Close()
		}
	})
	// Registered after the deletion, so it stops first: a running consumer
	// would declare its durable queue again.
	w.consume()
	return w
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// consume reads the durable queue with manual acks and reconnects across
// broker outages; a message counts once unless the broker delivers it anew
// (not as a redelivery), which is a real duplicate from the relay.
func (w *world) consume() {
	stop := make(chan struct{})
	ready := make(chan struct{})
	var once sync.Once
	w.t.Cleanup(func() { close(stop) })
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			c, err := w.dialAny()
			if err != nil {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			ch, err := c.Channel()
			if err == nil {
				err = ch.ExchangeDeclare(w.exchange, "topic", true, false, false, false, nil)
			}
			if err == nil {
				_, err = ch.QueueDeclare(w.queue, true, false, false, false, w.qargs)
			}
			if err == nil {
				err = ch.QueueBind(w.queue, "#", w.exchange, false, nil)
			}
			if err == nil {
				err = ch.Qos(1000, 0, false)
			}
			var deliveries <-chan amqp.Delivery
			if err == nil {
				deliveries, err = ch.Consume(w.queue, "", false, false, false, false, nil)
			}
			if err != nil {
				c.Close()
				time.Sleep(200 * time.Millisecond)
				continue
			}
			once.Do(func() { close(ready) })
		loop:
			for {
				select {
				case d, ok := <-deliveries:
					if !ok {
						break loop
					}
					w.mu.Lock()
					first := w.seen[d.MessageId] == 0
					if !d.Redelivered || first {
						w.seen[d.MessageId]++
					}
					if w.onDelivery != nil {
						w.onDelivery(d, first)
					}
					w.mu.Unlock()
					w.total.Add(1)
					_ = d.Ack(false)
				case <-stop:
					c.Close()
					return
				}
			}
			c.Close()
		}
	}()
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		w.t.Fatal("test consumer could not connect to RabbitMQ")
	}
}

// relayProc is the relay binary running as a subprocess.
type relayProc struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
	out    *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (w *world) startRelay(extra ...string) *relayProc {
	w.t.Helper()
	cmd := exec.Command(binary, "run")
	cmd.Env = append(append(os.Environ(), w.env...), extra...)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	must(w.t, cmd.Start())
	p := &relayProc{cmd: cmd, exited: make(chan struct{}), out: out}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	w.t.Cleanup(func() {
		logs := out.String()
		dump := ""
		if p.alive() {
			if w.t.Failed() {
				// A goroutine dump shows where a stuck relay waits. It is
				// printed apart from the log, which it would otherwise push
				// out of the tail.
				_ = p.cmd.Process.Signal(syscall.SIGQUIT)
				select {
				case <-p.exited:
				case <-time.After(2 * time.Second):
				}
				dump = strings.TrimPrefix(out.String(), logs)
			}
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if w.t.Failed() {
			w.t.Logf("relay output:\n%s", tail(logs, 30000))
			if dump != "" {
				w.t.Logf("relay goroutines at the end:\n%s", tail(dump, 20000))
			}
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func (p *relayProc) kill(t *testing.T) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// term sends SIGTERM and returns the exit code.
func (p *relayProc) term(t *testing.T, within time.Duration) int {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(within):
		t.Fatalf("relay did not exit within %s of SIGTERM", within)
		return -1
	}
}

func (p *relayProc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// producer inserts events in transactions of 1..5 until stopped. The table,
// not the producer, is the truth of what was committed.
type producer struct {
	stop chan struct{}
	done chan struct{}
	n    atomic.Int64
}

func (w *world) produce(every time.Duration) *producer {
	p := &producer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		ctx := context.Background()
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
			size := 1 + i%5
			tx, err := w.pool.Begin(ctx)
			if err != nil {
				continue // the database may be restarting
			}
			_, err = tx.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
				SELECT gen_random_uuid(), 'order', gen_random_uuid(), 'created', jsonb_build_object('i', $1::int)
				FROM generate_series(1, $2)`, i, size)
			if err == nil {
				_, err = tx.Exec(ctx, `INSERT INTO other (v) VALUES ('noise')`)
			}
			if err != nil {
				_ = tx.Rollback(ctx)
				continue
			}
			if i%7 == 3 {
				_ = tx.Rollback(ctx) // never published
				continue
			}
			if tx.Commit(ctx) == nil {
				p.n.Add(int64(size))
			}
		}
	}()
	return p
}

func (p *producer) halt() {
	close(p.stop)
	<-p.done
}

// verify waits until every committed row is marked and received, then
// reports events, lost and duplicated. Lost must be zero.
func (w *world) verify(timeout time.Duration) (events, lost, dups int) {
	w.t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	for {
		var ids []string
		rows, err := w.pool.Query(ctx, `SELECT id::text FROM outbox_events`)
		if err == nil {
			ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		var unpublished int
		if err == nil {
			err = w.pool.QueryRow(ctx, `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&unpublished)
		}
		if err == nil {
			w.mu.Lock()
			lost, dups = 0, 0
			for _, id := range ids {
				switch n := w.seen[id]; {
				case n == 0:
					lost++
				case n > 1:
					dups += n - 1
				}
			}
			extra := len(w.seen) - (len(ids) - lost)
			w.mu.Unlock()
			if extra > 0 {
				w.t.Fatalf("%d messages received for rows that do not exist (rolled back?)", extra)
			}
			if lost == 0 && unpublished == 0 {
				return len(ids), 0, dups
			}
			if time.Now().After(deadline) {
				w.t.Fatalf("after %s: %d of %d committed rows never delivered, %d unmarked", timeout, lost, len(ids), unpublished)
			}
		} else if time.Now().After(deadline) {
			w.t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// slotConfirmed returns the slot's confirmed_flush_lsn.
func (w *world) slotConfirmed() string {
	w.t.Helper()
	var lsn *string
	err := w.pool.QueryRow(context.Background(), `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, w.slot).Scan(&lsn)
	if err != nil || lsn == nil {
		return ""
	}
	return *lsn
}

// lsnLess compares two LSNs in the server.
func (w *world) lsnLess(a, b string) bool {
	w.t.Helper()
	var less bool
	must(w.t, w.pool.QueryRow(context.Background(), `SELECT $1::pg_lsn < $2::pg_lsn`, a, b).Scan(&less))
	return less
}

func (w *world) waitFor(timeout time.Duration, what string, cond func() bool) {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			w.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (w *world) received() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.seen)
}

// withHostPort rewrites a URL's host:port (to route through a proxy).
func withHostPort(raw, hostport string) string {
	u, err := url.Parse(raw)
	if err != nil {
		panic(err)
	}
	u.Host = hostport
	return u.String()
}

func hostPort(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		panic(err)
	}
	h := u.Host
	if _, _, err := net.SplitHostPort(h); err != nil {
		h = net.JoinHostPort(h, map[string]string{"amqp": "5672", "postgres": "5432", "postgresql": "5432"}[u.Scheme])
	}
	return h
}
