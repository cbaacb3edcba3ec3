//go:build faults

package faulttest

import (
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// TestSIGKILLUnderLoad kills the relay at random moments while events flow,
// again and again. Nothing committed is lost; duplicates come only from what
// was in flight at each kill.
func TestSIGKILLUnderLoad(t *testing.T) {
	w := newWorld(t)
	events, lost, dups := w.killRepeatedly(6)
	t.Logf("SIGKILL x6 under load: %d events, %d lost, %d duplicated", events, lost, dups)
}

// killRepeatedly kills the relay at random moments while a producer
// writes, then lets a last relay deliver everything and stop cleanly.
func (w *world) killRepeatedly(rounds int) (events, lost, dups int) {
	t := w.t
	prod := w.produce(2 * time.Millisecond)
	for round := 0; round < rounds; round++ {
		p := w.startRelay()
		time.Sleep(time.Duration(700+rand.IntN(1500)) * time.Millisecond)
		p.kill(t)
	}
	prod.halt()
	p := w.startRelay()
	events, lost, dups = w.verify(90 * time.Second)
	if code := p.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d after SIGTERM", code)
	}
	return events, lost, dups
}

// TestRabbitMQStopStart stops the broker's application for a few seconds
// under load. The relay does not exit, acknowledges nothing it could not
// publish meanwhile, reconnects and delivers everything.
func TestRabbitMQStopStart(t *testing.T) {
	w := newWorld(t)
	addr := freeAddr(t)
	p := w.startRelay("RELAY_METRICS_ADDR=" + addr)
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	if code := readyz(addr); code != http.StatusOK {
		t.Fatalf("/readyz = %d while streaming", code)
	}

	rabbitctl(t, "stop_app")
	stopped := true
	defer func() {
		if stopped {
			rabbitctl(t, "start_app")
		}
	}()
	time.Sleep(time.Second) // let the relay notice
	var during string
	must(t, w.pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()::text`).Scan(&during))
	w.waitFor(10*time.Second, "/readyz to report the outage", func() bool { return readyz(addr) == http.StatusServiceUnavailable })
	time.Sleep(2 * time.Second)
	if !p.alive() {
		t.Fatal("relay exited while RabbitMQ was down")
	}
	if c := w.slotConfirmed(); c != "" && !w.lsnLess(c, during) {
		t.Fatalf("slot acknowledged %s, past %s, while the broker was down", c, during)
	}
	rabbitctl(t, "start_app")
	stopped = false
	w.waitFor(30*time.Second, "/readyz to recover", func() bool { return readyz(addr) == http.StatusOK })
	prod.halt()
	events, lost, dups := w.verify(90 * time.Second)
	t.Logf("RabbitMQ stop_app/start_app: %d events, %d lost, %d duplicated", events, lost, dups)
	if !strings.Contains(p.out.String(), `"dependency":"rabbitmq"`) {
		t.Fatal("the relay did not log the broker failure by dependency")
	}
	if code := p.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d after SIGTERM", code)
	}
}

func rabbitctl(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmqctl %v: %v\n%s", args, err, out)
	}
	if args[0] == "start_app" {
		out, err := exec.Command("rabbitmqctl", "await_startup").CombinedOutput()
		if err != nil {
			t.Fatalf("rabbitmqctl await_startup: %v\n%s", err, out)
		}
	}
}

// TestBrokerConnectionCut cuts every connection to RabbitMQ (a network
// failure) several times under load.
func TestBrokerConnectionCut(t *testing.T) {
	w := newWorld(t)
	px := newProxy(t, hostPort(w.amqpURL))
	p := w.startRelay("RELAY_AMQP_URL=" + withHostPort(w.amqpURL, px.addr()))
	prod := w.produce(3 * time.Millisecond)
	for i := 0; i < 4; i++ {
		w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 20*(i+1) })
		px.Cut()
	}
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("AMQP connection cut x4: %d events, %d lost, %d duplicated", events, lost, dups)
	if !p.alive() {
		t.Fatal("relay exited")
	}
}

// TestBrokerStopsAnswering silences the broker without closing the
// connection: AMQP heartbeats detect it and the relay reconnects.
func TestBrokerStopsAnswering(t *testing.T) {
	w := newWorld(t)
	px := newProxy(t, hostPort(w.amqpURL))
	p := w.startRelay("RELAY_AMQP_URL="+withHostPort(w.amqpURL, px.addr()), "RELAY_AMQP_HEARTBEAT=1s")
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	px.Silence()
	w.waitFor(20*time.Second, "the relay to notice the silent broker", func() bool {
		return strings.Contains(p.out.String(), `"dependency":"rabbitmq"`)
	})
	px.Speak()
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("AMQP silent broker: %d events, %d lost, %d duplicated", events, lost, dups)
}

// TestPostgresRestart restarts PostgreSQL (fast shutdown) under load. The
// relay reconnects both connections and resumes from the slot.
func TestPostgresRestart(t *testing.T) {
	w := newWorld(t)
	p := w.startRelay()
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	pgctl(t, "restart", "-m", "fast")
	time.Sleep(2 * time.Second)
	prod.halt()
	events, lost, dups := w.verify(90 * time.Second)
	t.Logf("PostgreSQL restart -m fast: %d events, %d lost, %d duplicated", events, lost, dups)
	if !p.alive() {
		t.Fatal("relay exited")
	}
	if !strings.Contains(p.out.String(), `"dependency":"postgres"`) {
		t.Fatal("the relay did not log the database failure by dependency")
	}
}

func pgctl(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("bash", "-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -1) main "+strings.Join(args, " ")).CombinedOutput()
	if err != nil {
		t.Fatalf("pg_ctlcluster %v: %v\n%s", args, err, out)
	}
}

// TestDatabaseStopsAnswering silences PostgreSQL (replication and queries)
// without closing: the relay gives up after RELAY_POSTGRES_TIMEOUT and
// reconnects once the database answers again.
func TestDatabaseStopsAnswering(t *testing.T) {
	w := newWorld(t)
	px := newProxy(t, hostPort(w.dbURL))
	p := w.startRelay("RELAY_DATABASE_URL="+withHostPort(w.dbURL, px.addr()), "RELAY_POSTGRES_TIMEOUT=3s")
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	px.Silence()
	w.waitFor(30*time.Second, "the relay to notice the silent database", func() bool {
		return strings.Contains(p.out.String(), `"dependency":"postgres"`)
	})
	px.Speak()
	px.Cut() // drop what the silence left half-open
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("PostgreSQL silent: %d events, %d lost, %d duplicated", events, lost, dups)
}

// TestReplicationConnectionCut cuts the database connections (replication
// and pool) several times under load.
func TestReplicationConnectionCut(t *testing.T) {
	w := newWorld(t)
	px := newProxy(t, hostPort(w.dbURL))
	w.startRelay("RELAY_DATABASE_URL=" + withHostPort(w.dbURL, px.addr()))
	prod := w.produce(3 * time.Millisecond)
	for i := 0; i < 3; i++ {
		w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 30*(i+1) })
		px.Cut()
	}
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("PostgreSQL connection cut x3: %d events, %d lost, %d duplicated", events, lost, dups)
	// The broker is fine throughout: what was in flight is confirmed and
	// marked, or carried to the next session and only marked (README,
	// "What holds on each path"). A session ended by the ownership lock's
	// connection used to abandon it at once: 104 duplicates in one run.
	if dups != 0 {
		t.Errorf("%d events published twice across PostgreSQL connection cuts, want 0", dups)
	}
}

// TestExchangeDeletedUnderTheRelay: the broker closes the channel (404)
// when the exchange disappears; the relay reconnects, redeclares its
// topology and, with RELAY_UNROUTABLE=retry, holds events until a queue is
// bound again.
func TestExchangeDeletedUnderTheRelay(t *testing.T) {
	w := newWorld(t)
	w.startRelay("RELAY_UNROUTABLE=retry")
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	c, err := amqp.Dial(w.amqpURL)
	must(t, err)
	defer c.Close()
	ch, err := c.Channel()
	must(t, err)
	must(t, ch.ExchangeDelete(w.exchange, false, false))
	time.Sleep(2 * time.Second)
	// The relay redeclared the exchange; bind the queue again.
	must(t, ch.QueueBind(w.queue, "#", w.exchange, false, nil))
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("exchange deleted: %d events, %d lost, %d duplicated", events, lost, dups)
}

// TestSlotDroppedWhileDown: rows written while the slot did not exist are
// recovered from the table when the relay recreates it.
func TestSlotDroppedWhileDown(t *testing.T) {
	w := newWorld(t)
	p := w.startRelay()
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 30 })
	if code := p.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d", code)
	}
	_, err := w.pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, w.slot)
	must(t, err)
	time.Sleep(time.Second) // rows no slot will ever stream
	p = w.startRelay()
	time.Sleep(time.Second)
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("slot dropped while down: %d events, %d lost, %d duplicated", events, lost, dups)
	if !strings.Contains(p.out.String(), "created replication slot") {
		t.Fatal("the relay did not log the slot's recreation")
	}
}

// TestLostSlot: the slot is invalidated by max_slot_wal_keep_size while the
// relay is down; the relay drops and recreates it and publishes the rows
// from the table.
func TestLostSlot(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	p := w.startRelay()
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 30 })
	if code := p.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d", code)
	}
	prod.halt()
	// Rows the lost slot will never deliver.
	_, err := w.pool.Exec(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'order', gen_random_uuid(), 'written_while_lost', '{}' FROM generate_series(1, 500)`)
	must(t, err)
	_, err = w.pool.Exec(ctx, `ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'`)
	must(t, err)
	t.Cleanup(func() {
		_, _ = w.pool.Exec(context.Background(), `ALTER SYSTEM RESET max_slot_wal_keep_size`)
		_, _ = w.pool.Exec(context.Background(), `SELECT pg_reload_conf()`)
	})
	_, err = w.pool.Exec(ctx, `SELECT pg_reload_conf()`)
	must(t, err)
	w.waitFor(60*time.Second, "the slot to be lost", func() bool {
		for i := 0; i < 3; i++ {
			_, err := w.pool.Exec(ctx, `INSERT INTO other (v) SELECT repeat('w', 1000) FROM generate_series(1, 3000)`)
			must(t, err)
			_, err = w.pool.Exec(ctx, `SELECT pg_switch_wal()`)
			must(t, err)
		}
		_, err := w.pool.Exec(ctx, `CHECKPOINT`)
		must(t, err)
		var status *string
		must(t, w.pool.QueryRow(ctx, `SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1`, w.slot).Scan(&status))
		return status != nil && *status == "lost"
	})
	_, err = w.pool.Exec(ctx, `ALTER SYSTEM RESET max_slot_wal_keep_size`)
	must(t, err)
	_, err = w.pool.Exec(ctx, `SELECT pg_reload_conf()`)
	must(t, err)

	p = w.startRelay()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("slot lost (max_slot_wal_keep_size): %d events, %d lost, %d duplicated", events, lost, dups)
	if !strings.Contains(p.out.String(), "replication slot is LOST") {
		t.Fatal("the relay did not log the lost slot loudly")
	}
}

// TestSecondSignalExitsAtOnce: SIGTERM drains, but a second signal while
// the drain waits on a silent broker exits at once.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	w := newWorld(t)
	px := newProxy(t, hostPort(w.amqpURL))
	p := w.startRelay("RELAY_AMQP_URL="+withHostPort(w.amqpURL, px.addr()), "RELAY_SHUTDOWN_TIMEOUT=60s")
	prod := w.produce(2 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	px.Silence()
	time.Sleep(300 * time.Millisecond)
	prod.halt()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(time.Second)
	if !p.alive() {
		t.Fatal("relay exited before its in-flight events were confirmed")
	}
	start := time.Now()
	code := p.term(t, 5*time.Second)
	if code == 0 {
		t.Fatal("relay exited 0 on the second signal, with work abandoned")
	}
	t.Logf("second signal: exited %d after %s", code, time.Since(start).Round(time.Millisecond))
	px.Speak()
	px.Cut()
	w.startRelay()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("after an abandoned drain: %d events, %d lost, %d duplicated", events, lost, dups)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer ln.Close()
	return ln.Addr().String()
}

func readyz(addr string) int {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestRabbitMQFullRestart stops the whole broker node and starts it again
// (rabbitmqctl stop, rabbitmq-server -detached) under load.
func TestRabbitMQFullRestart(t *testing.T) {
	w := newWorld(t)
	p := w.startRelay()
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow", func() bool { return w.received() > 50 })
	rabbitctl(t, "stop")
	running := false
	defer func() {
		if !running {
			startRabbit(t)
		}
	}()
	time.Sleep(2 * time.Second)
	if !p.alive() {
		t.Fatal("relay exited while RabbitMQ was down")
	}
	startRabbit(t)
	running = true
	time.Sleep(2 * time.Second)
	prod.halt()
	events, lost, dups := w.verify(120 * time.Second)
	t.Logf("RabbitMQ full restart: %d events, %d lost, %d duplicated", events, lost, dups)
}

// startRabbit starts the broker node as this kind of machine does.
func startRabbit(t *testing.T) {
	t.Helper()
	out, err := exec.Command("rabbitmq-server", "-detached").CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmq-server -detached: %v\n%s", err, out)
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		if err := exec.Command("rabbitmqctl", "await_startup").Run(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("RabbitMQ did not start again within 90 s")
		}
		time.Sleep(time.Second)
	}
}
