package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// The binary under test is built once per test binary, on first use, and
// removed by TestMain. Under -race it is built with -race too, so a data race
// in the relay fails the subprocess tests.
var (
	binDir   string
	binOnce  sync.Once
	binPath  string
	binError error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// relayBinary returns the path of the built outbox-relay binary.
func relayBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binError = os.MkdirTemp("", "outbox-relay-cmdtest-")
		if binError != nil {
			return
		}
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		path := filepath.Join(binDir, "outbox-relay")
		args := []string{"build", "-o", path}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command(goTool, append(args, ".")...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			binError = fmt.Errorf("go build ./cmd/outbox-relay: %v\n%s", err, out)
			return
		}
		binPath = path
	})
	if binError != nil {
		t.Fatal(binError)
	}
	return binPath
}

// baseEnv is this process's environment without any RELAY_* variable, so a
// developer's shell never leaks into a test.
func baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "RELAY_") {
			env = append(env, kv)
		}
	}
	return env
}

// envList turns vars into KEY=value pairs on top of baseEnv. A key mapped to
// "\x00" is left unset.
func envList(vars map[string]string) []string {
	env := baseEnv()
	for k, v := range vars {
		if v != "\x00" {
			env = append(env, k+"="+v)
		}
	}
	return env
}

// syncBuffer is a bytes.Buffer safe for a writer goroutine and readers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is a running outbox-relay subprocess.
type proc struct {
	t      testing.TB
	cmd    *exec.Cmd
	stdout syncBuffer
	all    syncBuffer // stdout and stderr interleaved
	done   chan struct{}
	code   int
}

// start runs the binary with args and the given RELAY_* variables. A cleanup
// kills it if the test did not wait for it, and logs its output if the test
// failed.
func start(t testing.TB, vars map[string]string, args ...string) *proc {
	t.Helper()
	return startBinary(t, relayBinary(t), vars, args...)
}

// startBinary is start with the binary at path.
func startBinary(t testing.TB, path string, vars map[string]string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, done: make(chan struct{})}
	p.cmd = exec.Command(path, args...)
	p.cmd.Env = envList(vars)
	p.cmd.Stdout = io.MultiWriter(&p.stdout, &p.all)
	p.cmd.Stderr = &p.all
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start outbox-relay %v: %v", args, err)
	}
	go func() {
		err := p.cmd.Wait()
		p.code = 0
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			p.code = ee.ExitCode()
		case err != nil:
			p.code = -1
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("output of outbox-relay %s:\n%s", strings.Join(args, " "), p.all.String())
		}
	})
	return p
}

// runBin runs the binary to completion and returns its stdout, all its output
// and its exit code.
func runBin(t testing.TB, vars map[string]string, timeout time.Duration, args ...string) (stdout, all string, code int) {
	t.Helper()
	p := start(t, vars, args...)
	code = p.wait(timeout)
	return p.stdout.String(), p.all.String(), code
}

// wait waits for the process to exit and returns its exit code; it fails the
// test (killing the process) after timeout.
func (p *proc) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		p.t.Fatalf("outbox-relay did not exit within %s; output:\n%s", timeout, p.all.String())
		return -1
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %v: %v", sig, err)
	}
}

// waitOutput waits until the output contains substr; false if the process
// exited or timeout passed first.
func (p *proc) waitOutput(substr string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(p.all.String(), substr) {
			return true
		}
		if p.exited() {
			return strings.Contains(p.all.String(), substr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// eventually polls cond every 50ms until it holds or timeout passes.
func eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// relayEnv is one test's isolated world: its own database, slot, exchange
// and dead-letter exchange on the shared servers.
type relayEnv struct {
	dbURL    string
	amqpURL  string
	slot     string
	exchange string
	dlx      string
}

func newRelayEnv(t *testing.T) *relayEnv {
	t.Helper()
	e := &relayEnv{
		dbURL:   testenv.Postgres(t),
		amqpURL: testenv.AMQP(t),
	}
	e.slot = testenv.Slot(t, e.dbURL)
	e.exchange = testenv.Name(t, "ex")
	e.dlx = testenv.Name(t, "dlx")
	amqpURL, exchange, dlx := e.amqpURL, e.exchange, e.dlx
	t.Cleanup(func() { deleteTopology(t, amqpURL, exchange, dlx) })
	return e
}

// vars are the RELAY_* variables of a relay in this environment.
func (e *relayEnv) vars() map[string]string {
	return map[string]string{
		"RELAY_DATABASE_URL":         e.dbURL,
		"RELAY_AMQP_URL":             e.amqpURL,
		"RELAY_SLOT":                 e.slot,
		"RELAY_EXCHANGE":             e.exchange,
		"RELAY_DEAD_LETTER_EXCHANGE": e.dlx,
		"RELAY_METRICS_ADDR":         "127.0.0.1:0",
		"RELAY_LOG_FORMAT":           "json",
		"RELAY_LOG_LEVEL":            "info",
	}
}

// with returns vars with some overridden.
func with(vars map[string]string, kv ...string) map[string]string {
	out := make(map[string]string, len(vars)+len(kv)/2)
	for k, v := range vars {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

// migrate runs `outbox-relay migrate` and fails the test unless it exits 0.
func (e *relayEnv) migrate(t *testing.T) string {
	t.Helper()
	stdout, all, code := runBin(t, e.vars(), 60*time.Second, "migrate")
	if code != 0 {
		t.Fatalf("migrate exited %d:\n%s", code, all)
	}
	return stdout
}

func (e *relayEnv) conn(t *testing.T) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// deleteTopology removes what the relay and the test declared on the shared
// broker: the exchanges and the dead-letter queue the relay creates.
func deleteTopology(t testing.TB, amqpURL, exchange, dlx string) {
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Logf("cleanup: connect to RabbitMQ: %v", err)
		return
	}
	defer conn.Close()
	for _, f := range []func(ch *amqp.Channel) error{
		func(ch *amqp.Channel) error { _, err := ch.QueueDelete(dlx, false, false, false); return err },
		func(ch *amqp.Channel) error { return ch.ExchangeDelete(dlx, false, false) },
		func(ch *amqp.Channel) error { return ch.ExchangeDelete(exchange, false, false) },
	} {
		// A failed delete closes the channel: one channel each.
		ch, err := conn.Channel()
		if err != nil {
			t.Logf("cleanup: channel: %v", err)
			return
		}
		if err := f(ch); err != nil {
			t.Logf("cleanup: %v", err)
		}
		ch.Close()
	}
}

// consumer counts the messages routed to an exclusive queue bound with "#"
// to the test's exchange.
type consumer struct {
	mu     sync.Mutex
	counts map[string]int // message_id → deliveries
	total  int
	bad    []string // deliveries missing a message_id or the wrong properties
}

func newConsumer(t *testing.T, amqpURL, exchange string) *consumer {
	t.Helper()
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatalf("connect to RabbitMQ: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	// Exactly the relay's declaration, so either may come first.
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		t.Fatalf("declare exchange: %v", err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatalf("declare queue: %v", err)
	}
	if err := ch.QueueBind(q.Name, "#", exchange, false, nil); err != nil {
		t.Fatalf("bind queue: %v", err)
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	c := &consumer{counts: make(map[string]int)}
	go func() {
		for d := range deliveries {
			c.mu.Lock()
			c.total++
			c.counts[d.MessageId]++
			if d.MessageId == "" || d.ContentType != "application/json" || d.DeliveryMode != amqp.Persistent {
				c.bad = append(c.bad, fmt.Sprintf("%s: content_type=%q delivery_mode=%d", d.MessageId, d.ContentType, d.DeliveryMode))
			}
			c.mu.Unlock()
		}
	}()
	return c
}

// snapshot returns (distinct ids, total deliveries, ids delivered more than once).
func (c *consumer) snapshot() (distinct, total int, dups []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, n := range c.counts {
		if n > 1 {
			dups = append(dups, fmt.Sprintf("%s×%d", id, n))
		}
	}
	return len(c.counts), c.total, dups
}

func (c *consumer) received(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counts[id] > 0
}

func (c *consumer) ids() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	ids := make([]string, 0, len(c.counts))
	for id := range c.counts {
		ids = append(ids, id)
	}
	return ids
}

func (c *consumer) badDeliveries() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.bad...)
}
