// Command outbox-relay-bench measures outbox-relay against the local
// PostgreSQL and RabbitMQ, side by side with the broker's own limit and the
// polling design it replaces, in one run (issue 4):
//
//  1. backlog drain: N rows written while the relay is stopped (its slot
//     already exists, so they come through the stream), then the time until
//     a consumer has every one and every row is marked;
//  2. the broker's single-client limit for the same messages, with a window
//     of 1,000 confirms and with none;
//  3. the seed's polling design, ported to Go, on a backlog of -poll-n rows;
//  4. commit → receipt latency at steady offered loads;
//  5. the relay's CPU per 1,000 events, peak RSS, and its queries while idle.
//
// The relay runs as a subprocess built from ./cmd/outbox-relay, so its CPU
// (utime+stime from /proc/<pid>/stat) and peak RSS (VmHWM) are its own.
// Everything the bench creates (a database outbox_bench_<random> with its
// slot, exchanges, queues) is removed at the end, also after a failure or
// Ctrl-C. Any event not received, or any row not marked, fails the run.
//
//	cd bench && go run . [-n 100000] [-repeat 3] [-json …] [-png …]
package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	DatabaseURL     string        `json:"-"`
	AMQPURL         string        `json:"-"`
	N               int           `json:"n"`
	Repeat          int           `json:"repeat"`
	PollN           int           `json:"poll_n"`
	PollRepeat      int           `json:"poll_repeat"`
	PollRate        float64       `json:"poll_rate"`
	LatencyDuration time.Duration `json:"latency_duration_ns"`
	LatencyRates    []float64     `json:"latency_rates"`
	LatencyTxRows   []int         `json:"latency_tx_rows"`
	Producers       int           `json:"producers"`
	IdleDuration    time.Duration `json:"idle_duration_ns"`
	PadBytes        int           `json:"pad_bytes"`
	BacklogTxRows   int           `json:"backlog_tx_rows"`
	Window          int           `json:"broker_window"`
	Stall           time.Duration `json:"stall_timeout_ns"`
	JSONPath        string        `json:"-"`
	PNGPath         string        `json:"-"`
	RelayBin        string        `json:"-"`
	Keep            bool          `json:"-"`
}

func envOr(def string, names ...string) string {
	for _, n := range names {
		if v := os.Getenv(n); v != "" {
			return v
		}
	}
	return def
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("outbox-relay-bench", flag.ContinueOnError)
	fs.StringVar(&o.DatabaseURL, "database-url", envOr("postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable", "BENCH_DATABASE_URL", "OUTBOX_TEST_DATABASE_URL"),
		"admin URL of the PostgreSQL server (wal_level=logical); the bench creates and drops its own database (env BENCH_DATABASE_URL, then OUTBOX_TEST_DATABASE_URL)")
	fs.StringVar(&o.AMQPURL, "amqp-url", envOr("amqp://guest:guest@127.0.0.1:5672/", "BENCH_AMQP_URL", "OUTBOX_TEST_AMQP_URL"),
		"RabbitMQ URL (env BENCH_AMQP_URL, then OUTBOX_TEST_AMQP_URL)")
	fs.IntVar(&o.N, "n", 100000, "backlog size for the drain and the broker limit (1000000 is fine)")
	fs.IntVar(&o.Repeat, "repeat", 3, "repeats of each measurement; medians are quoted")
	fs.IntVar(&o.PollN, "poll-n", 0, "backlog for the polling design (default min(n, 20000); it drains about 200 events/s)")
	fs.IntVar(&o.PollRepeat, "poll-repeat", 1, "repeats of the polling drain and of its latency (bounded by its 500 ms tick, so they vary little; 20,000 rows take 100 s)")
	fs.Float64Var(&o.PollRate, "poll-rate", 200, "offered load (events/s) for the polling design's latency")
	fs.DurationVar(&o.LatencyDuration, "latency-duration", 10*time.Second, "duration of each steady-load latency measurement")
	rates := fs.String("latency-rates", "1000,5000", "offered loads (events/s) for the relay's latency")
	txRows := fs.String("latency-tx-rows", "1,10", "events per transaction for the relay's latency")
	fs.IntVar(&o.Producers, "producers", 0, "producer connections for the steady loads (0: max(4, transactions/s ÷ 250), at most 32: each COMMIT waits for its WAL flush, so single-row loads need group commit)")
	fs.DurationVar(&o.IdleDuration, "idle-duration", 10*time.Second, "how long to watch the relay's queries while the outbox is idle")
	fs.IntVar(&o.PadBytes, "pad", 200, "payload padding (bytes of \"x\"); the body is {\"pad\": …, \"seq\": n}")
	fs.IntVar(&o.BacklogTxRows, "backlog-tx-rows", 1, "rows per transaction in the backlog (1: one event per transaction, the common case)")
	fs.IntVar(&o.Window, "window", 1000, "outstanding confirms for the broker limit with confirms")
	fs.DurationVar(&o.Stall, "stall-timeout", 60*time.Second, "fail if no event arrives (or no row is marked) for this long")
	fs.StringVar(&o.JSONPath, "json", "bench-results/results.json", "write the results as JSON here, relative to the repository root (empty: don't)")
	fs.StringVar(&o.PNGPath, "png", "docs/bench.png", "write the picture here, relative to the repository root (empty: don't)")
	fs.StringVar(&o.RelayBin, "relay-bin", "", "use this outbox-relay binary instead of building ./cmd/outbox-relay")
	fs.BoolVar(&o.Keep, "keep", false, "keep the database, slot, exchanges and queues (debugging)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	var err error
	if o.LatencyRates, err = parseFloats(*rates); err != nil {
		return o, fmt.Errorf("-latency-rates: %w", err)
	}
	var tx []float64
	if tx, err = parseFloats(*txRows); err != nil {
		return o, fmt.Errorf("-latency-tx-rows: %w", err)
	}
	for _, v := range tx {
		o.LatencyTxRows = append(o.LatencyTxRows, int(v))
	}
	if o.PollN == 0 {
		o.PollN = min(o.N, 20000)
	}
	switch {
	case o.N < 1, o.Repeat < 1, o.PollN < 0, o.PollRepeat < 1, o.Producers < 0, o.PadBytes < 0, o.BacklogTxRows < 1, o.Window < 1:
		return o, errors.New("-n, -repeat, -poll-repeat, -producers, -backlog-tx-rows and -window must be positive")
	case o.N >= 1<<48:
		return o, errors.New("-n is too large")
	}
	return o, nil
}

func parseFloats(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.ParseFloat(f, 64)
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, v)
	}
	return out, nil
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "outbox-relay-bench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b := &bench{opt: o}
	runErr := b.run(ctx)
	if cerr := b.cleanup(); cerr != nil {
		fmt.Fprintln(os.Stderr, "outbox-relay-bench: cleanup:", cerr)
		if runErr == nil {
			runErr = cerr
		}
	}
	if runErr != nil {
		fmt.Fprintln(os.Stderr, "outbox-relay-bench: FAILED:", runErr)
		os.Exit(1)
	}
}

func randomTag() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint32(b[:])
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%7.1fs] %s\n", time.Since(base).Seconds(), fmt.Sprintf(format, args...))
}

// moduleRoot is the relay's module root: the parent of the bench's own
// module (bench/go.mod), where ./cmd/outbox-relay is built from.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run the bench from its module, bench/ (make bench does)")
	}
	for dir := filepath.Dir(mod); ; dir = filepath.Dir(dir) {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(b), "module github.com/outbox-relay/outbox-relay\n") {
			return dir, nil
		}
		if dir == filepath.Dir(dir) {
			return "", fmt.Errorf("no outbox-relay module above %s", mod)
		}
	}
}

func gitDescribe(root string) string {
	cmd := exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return runtime.GOARCH
}
