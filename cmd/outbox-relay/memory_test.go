package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// The memory test measures a binary built without -race: the race detector
// multiplies the memory of every allocation, so its RSS says nothing about
// the relay's.
var (
	plainOnce  sync.Once
	plainPath  string
	plainError error
)

func plainRelayBinary(t testing.TB) string {
	t.Helper()
	plainOnce.Do(func() {
		if !raceEnabled {
			plainPath = relayBinary(t)
			return
		}
		relayBinary(t) // creates binDir, removed by TestMain
		if binError != nil {
			plainError = binError
			return
		}
		path := filepath.Join(binDir, "outbox-relay-norace")
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		out, err := exec.Command(goTool, "build", "-o", path, ".").CombinedOutput()
		if err != nil {
			plainError = fmt.Errorf("go build ./cmd/outbox-relay: %v\n%s", err, out)
			return
		}
		plainPath = path
	})
	if plainError != nil {
		t.Fatal(plainError)
	}
	return plainPath
}

// peakRSS reads VmHWM (the peak resident set) of a running process, in bytes.
func peakRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("VmHWM %q: %w", rest, err)
			}
			return kb << 10, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}

// stallProxy forwards TCP to target and, once armed, holds the client's
// data after its first stallAfter bytes until released: a broker that
// stops taking publishes (a memory alarm, a full disk, a slow network)
// while the relay keeps reading the stream.
type stallProxy struct {
	ln      net.Listener
	target  string
	release chan struct{}
	once    sync.Once
}

const stallAfter = 256 << 10 // past the AMQP handshake and topology, into the first publish

func newStallProxy(t *testing.T, target string) *stallProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	p := &stallProxy{ln: ln, target: target, release: make(chan struct{})}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		p.open()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				client.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, client, server)
			mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); p.pipe(server, client); server.Close() }()
			go func() { defer wg.Done(); io.Copy(client, server); client.Close() }() //nolint:errcheck // ends with either side
		}
	}()
	return p
}

func (p *stallProxy) addr() string { return p.ln.Addr().String() }

func (p *stallProxy) open() { p.once.Do(func() { close(p.release) }) }

// pipe copies src to dst, holding everything after stallAfter bytes until
// the proxy is opened.
func (p *stallProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	passed, stall := 0, true
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if stall && passed+n > stallAfter {
				<-p.release
				stall = false
			}
			passed += n
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestLargePayloadBacklogBoundedRSS (invariant 9: memory bounded in bytes,
// not only in events): a backlog of 600 events of 1 MB each, written while
// the relay was stopped, is drained with a peak RSS under 256 MB, whether
// the broker keeps up or stops taking publishes for a while. Without a byte
// bound, each stage of the pipeline may hold up to RELAY_PUBLISH_WINDOW
// payloads: the whole backlog and more.
func TestLargePayloadBacklogBoundedRSS(t *testing.T) {
	testenv.Integration(t)
	for _, c := range []memoryCase{
		{name: "broker keeps up"},
		{name: "broker stalls", stall: true},
		// The marker waits to fill a batch of 1,000: every confirmed event
		// sits in it until the stop's drain marks them.
		{name: "marks wait", vars: []string{"RELAY_MARK_DELAY", "1m", "RELAY_MARK_BATCH_SIZE", "1000"}, marksWait: true},
		// No slot yet: the backlog comes from the table sweep, which reads
		// pages of rows before they enter the pipeline's budget.
		{name: "swept backlog", sweep: true},
	} {
		t.Run(c.name, func(t *testing.T) { drainLargePayloads(t, c) })
	}
}

type memoryCase struct {
	name      string
	vars      []string // RELAY_* overrides, key then value
	stall     bool     // the broker stops taking publishes for a while
	marksWait bool     // rows are marked only by the stop's drain
	sweep     bool     // the backlog is written before the slot exists
}

func drainLargePayloads(t *testing.T, c memoryCase) {
	const (
		events   = 600
		limitRSS = 256 << 20
	)
	e := newRelayEnv(t)
	e.migrate(t)
	cons := newConsumer(t, e.amqpURL, e.exchange)
	db := e.conn(t)
	bin := plainRelayBinary(t)

	if !c.sweep {
		// A first run creates the slot, so that the backlog comes through
		// the stream, not the table sweep.
		first := startBinary(t, bin, e.vars(), "run")
		if !first.waitOutput(`"message":"streaming"`, 30*time.Second) {
			t.Fatalf("the relay did not start streaming within 30s")
		}
		first.signal(syscall.SIGTERM)
		if code := first.wait(30 * time.Second); code != 0 {
			t.Fatalf("first run: exit code after SIGTERM = %d, want 0", code)
		}
	}

	// Valid JSON of about 1 MB each (it compresses to almost nothing in the
	// table, but the stream and the broker carry every byte).
	if _, err := db.Exec(t.Context(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'big', gen_random_uuid(), 'loaded', jsonb_build_object('i', i, 'pad', repeat('x', 1000000))
		FROM generate_series(1, $1) AS i`, events); err != nil {
		t.Fatalf("insert the backlog: %v", err)
	}

	vars := with(e.vars(), c.vars...)
	var proxy *stallProxy
	if c.stall {
		u, err := url.Parse(e.amqpURL)
		if err != nil {
			t.Fatal(err)
		}
		proxy = newStallProxy(t, u.Host)
		u.Host = proxy.addr()
		// The stall must not look like a dead broker (two missed heartbeats).
		vars = with(vars, "RELAY_AMQP_URL", u.String(), "RELAY_AMQP_HEARTBEAT", "60s")
	}
	p := startBinary(t, bin, vars, "run")
	pid := p.cmd.Process.Pid
	if c.stall {
		// Hold the broker until the relay has read what it is going to
		// read (its RSS over the limit, or 20 s), then let it drain.
		eventually(20*time.Second, func() bool {
			peak, err := peakRSS(pid)
			return err != nil || peak > limitRSS
		})
		proxy.open()
	}
	unpublished := func() int {
		var n int
		if err := db.QueryRow(t.Context(), `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&n); err != nil {
			t.Fatalf("count unpublished rows: %v", err)
		}
		return n
	}
	drained := eventually(3*time.Minute, func() bool {
		if p.exited() {
			return true
		}
		n, _, _ := cons.snapshot()
		return n >= events && (c.marksWait || unpublished() == 0)
	})
	if p.exited() {
		t.Fatalf("the relay exited (code %d) while draining the backlog", p.code)
	}
	// VmHWM is the peak over the process's life: read it before it exits.
	peak, err := peakRSS(pid)
	if err != nil {
		t.Fatalf("read the relay's peak RSS: %v", err)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(30 * time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	distinct, total, _ := cons.snapshot()
	t.Logf("peak RSS (VmHWM) while draining %d events of 1 MB: %d MiB (limit %d MiB); received %d distinct, %d in all",
		events, peak>>20, limitRSS>>20, distinct, total)
	if !drained {
		t.Fatalf("backlog not drained within 3 minutes: received %d of %d, %d rows unpublished", distinct, events, unpublished())
	}
	if n := unpublished(); n != 0 {
		t.Fatalf("%d rows unpublished after the drain", n)
	}
	if peak > limitRSS {
		t.Fatalf("peak RSS %d MiB while draining %d events of 1 MB, want under %d MiB: memory is not bounded in bytes",
			peak>>20, events, limitRSS>>20)
	}
}
