package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp "github.com/rabbitmq/amqp091-go"
)

type bench struct {
	mode        string // RELAY_ON_PUBLISHED of the relay started next
	pgstattuple bool
	opt         options
	tag         uint32
	name        string // database, slot and prefix of every broker object
	root        string
	tmp         string

	dbURL     string
	admin     *pgx.Conn
	dbCreated bool
	pool      *pgxpool.Pool

	amqpConn *amqp.Connection
	amqpCh   *amqp.Channel
	topology bool
	cons     *consumer

	relayBin   string
	relayEnv   []string
	metricsURL string // the relay's /metrics
	relay      *relayProc
	relayRun   int
	poller     *pollingProcessor
	phase      int
	trackers   []*tracker

	res results
}

func (b *bench) exchange() string   { return b.name + ".events" }
func (b *bench) deadLetter() string { return b.name + ".dead-letter" }
func (b *bench) queue() string      { return b.name + ".consumer" }
func (b *bench) pollQueue() string  { return b.name + ".polling" }

const routingKey = "bench.Created" // the relay's {aggregate_type}.{event_type}

func (b *bench) nextPhase(t *tracker) int {
	b.phase++
	b.cons.register(b.phase, t)
	b.trackers = append(b.trackers, t)
	return b.phase
}

func (b *bench) run(ctx context.Context) error {
	o := b.opt
	b.tag = randomTag()
	b.name = fmt.Sprintf("outbox_bench_%08x", b.tag)
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	b.root = root
	// Relative output paths are the repository's (docs/bench.png is the
	// README's picture), wherever the bench is run from.
	for _, p := range []*string{&b.opt.JSONPath, &b.opt.PNGPath} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(root, *p)
		}
	}
	o = b.opt
	b.res = results{
		Started: time.Now().UTC(), Options: o, CPUs: runtime.NumCPU(), CPUModel: cpuModel(),
		GoVersion: runtime.Version(), RelayVersion: gitDescribe(root), Database: b.name,
	}
	logf("outbox-relay-bench: run %s, n=%d, repeat=%d, poll-n=%d, latency %s per load", b.name, o.N, o.Repeat, o.PollN, o.LatencyDuration)

	if b.tmp, err = os.MkdirTemp("", "outbox-relay-bench-"); err != nil {
		return err
	}
	if o.RelayBin != "" {
		b.relayBin = o.RelayBin
	} else {
		logf("building ./cmd/outbox-relay (%s)", b.res.RelayVersion)
		if b.relayBin, err = buildRelay(ctx, root, b.tmp); err != nil {
			return err
		}
	}

	// PostgreSQL: a fresh database, migrated by the relay's own migrate.
	if b.admin, err = connect(ctx, o.DatabaseURL, "outbox-relay-bench admin"); err != nil {
		return fmt.Errorf("connect to -database-url: %w", err)
	}
	if err := b.admin.QueryRow(ctx, `SELECT current_setting('server_version')`).Scan(&b.res.PostgresVersion); err != nil {
		return err
	}
	if _, err := b.admin.Exec(ctx, `CREATE DATABASE `+pgx.Identifier{b.name}.Sanitize()); err != nil {
		return fmt.Errorf("create database %s: %w", b.name, err)
	}
	b.dbCreated = true
	if b.dbURL, err = withDatabase(o.DatabaseURL, b.name); err != nil {
		return err
	}
	metricsAddr, err := freeAddr()
	if err != nil {
		return err
	}
	b.metricsURL = "http://" + metricsAddr + "/metrics"
	b.relayEnv = append(os.Environ(),
		"RELAY_DATABASE_URL="+b.dbURL,
		"RELAY_AMQP_URL="+o.AMQPURL,
		"RELAY_SLOT="+b.name,
		"RELAY_EXCHANGE="+b.exchange(),
		"RELAY_DEAD_LETTER_EXCHANGE="+b.deadLetter(),
		"RELAY_METRICS_ADDR="+metricsAddr,
		"RELAY_LOG_FORMAT=json",
	)
	if out, err := b.relayCommand(ctx, "migrate"); err != nil {
		return fmt.Errorf("outbox-relay migrate: %w\n%s", err, out)
	}
	if b.pool, err = newPool(ctx, b.dbURL, "outbox-relay-bench", 4); err != nil {
		return err
	}
	if err := b.prepareCost(ctx); err != nil {
		return err
	}

	// RabbitMQ: the relay's exchange (declared as the relay declares it),
	// a durable queue bound to everything, the polling design's queue, and
	// one consumer on both.
	if err := b.declareTopology(); err != nil {
		return err
	}
	if b.cons, err = newConsumer(o.AMQPURL, b.tag); err != nil {
		return err
	}
	if err := b.cons.consume(b.queue()); err != nil {
		return err
	}
	if err := b.cons.consume(b.pollQueue()); err != nil {
		return err
	}

	// The relay creates its slot (and sweeps the empty table), then stops:
	// from here on, rows written while it is stopped come through the slot.
	if err := b.createSlot(ctx); err != nil {
		return err
	}

	for i := 0; i < o.Repeat; i++ {
		for _, mode := range onPublished {
			d, err := b.relayDrain(ctx, i, mode)
			if err != nil {
				return err
			}
			if mode == "mark" {
				b.res.Drain = append(b.res.Drain, d)
			} else {
				b.res.DrainDelete = append(b.res.DrainDelete, d)
			}
		}
		for _, window := range []int{o.Window, 0} {
			name := fmt.Sprintf("broker limit, window %d, run %d", window, i+1)
			if window == 0 {
				name = fmt.Sprintf("broker limit, no confirms, run %d", i+1)
			}
			t := newTracker(name, o.N, 1)
			phase := b.nextPhase(t)
			logf("%s: %d messages", name, o.N)
			r, err := brokerLimit(ctx, o.AMQPURL, b.exchange(), routingKey, b.cons, t, b.tag, phase, o.N, window, o.PadBytes, o.Stall,
				func(s string) { logf("%s: %s", name, s) })
			if err != nil {
				return err
			}
			logf("%s: %.0f msg/s (%.2f s)", name, r.Rate, r.Seconds)
			if window > 0 {
				b.res.BrokerConfirms = append(b.res.BrokerConfirms, r)
			} else {
				b.res.BrokerNoConfirms = append(b.res.BrokerNoConfirms, r)
			}
		}
	}

	// The relay is still running from the last drain, idle since the
	// broker limits.
	if b.res.Idle, err = b.measureIdle(ctx); err != nil {
		return err
	}

	// The relay still runs in the last drain's mode (delete): latency in
	// delete mode first, single-event transactions only, then the mark's.
	for rep := 0; rep < o.Repeat; rep++ {
		for _, rate := range o.LatencyRates {
			if err := b.latency(ctx, "relay (delete)", rate, 1, rep); err != nil {
				return err
			}
		}
	}
	logf("restarting the relay with RELAY_ON_PUBLISHED=mark for the latency runs")
	if err := b.stopRelay(); err != nil {
		return err
	}
	b.mode = "mark"
	if err := b.startRelay(); err != nil {
		return err
	}
	for rep := 0; rep < o.Repeat; rep++ {
		for _, rate := range o.LatencyRates {
			for _, k := range o.LatencyTxRows {
				if err := b.latency(ctx, "relay", rate, k, rep); err != nil {
					return err
				}
			}
		}
	}
	logf("stopping the relay for the polling design")
	if err := b.stopRelay(); err != nil {
		return err
	}

	if err := b.polling(ctx); err != nil {
		return err
	}

	if err := b.finalChecks(ctx); err != nil {
		return err
	}
	b.res.Finished = time.Now().UTC()
	b.res.summarize()
	fmt.Print(b.res.markdown())
	if o.JSONPath != "" {
		if err := b.res.writeJSON(o.JSONPath); err != nil {
			return err
		}
		logf("wrote %s", o.JSONPath)
	}
	if o.PNGPath != "" {
		if err := b.res.writePNG(o.PNGPath); err != nil {
			return err
		}
		logf("wrote %s", o.PNGPath)
	}
	return nil
}

func (b *bench) relayCommand(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, b.relayBin, args...)
	cmd.Env = b.relayEnv
	return cmd.CombinedOutput()
}

func (b *bench) declareTopology() error {
	conn, err := amqp.DialConfig(b.opt.AMQPURL, amqp.Config{Properties: amqp.Table{"connection_name": "outbox-relay-bench admin"}})
	if err != nil {
		return fmt.Errorf("connect to -amqp-url: %w", err)
	}
	b.amqpConn = conn
	if b.amqpCh, err = conn.Channel(); err != nil {
		return err
	}
	b.topology = true
	if err := b.amqpCh.ExchangeDeclare(b.exchange(), amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange: %w", err)
	}
	if _, err := b.amqpCh.QueueDeclare(b.queue(), true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare queue: %w", err)
	}
	if err := b.amqpCh.QueueBind(b.queue(), "#", b.exchange(), false, nil); err != nil {
		return fmt.Errorf("bind queue: %w", err)
	}
	// As the seed's queue_declare with default options.
	if _, err := b.amqpCh.QueueDeclare(b.pollQueue(), false, false, false, false, nil); err != nil {
		return fmt.Errorf("declare polling queue: %w", err)
	}
	return nil
}

func (b *bench) startRelay() error {
	b.relayRun++
	env := append(append([]string(nil), b.relayEnv...), "RELAY_ON_PUBLISHED="+cmp.Or(b.mode, "mark"))
	p, err := startRelay(b.relayBin, env, filepath.Join(b.tmp, "relay.log"))
	if err != nil {
		return err
	}
	b.relay = p
	return nil
}

// onPublished is RELAY_ON_PUBLISHED's values, as the bench runs them.
var onPublished = []string{"mark", "delete"}

func (b *bench) stopRelay() error {
	if b.relay == nil {
		return nil
	}
	p := b.relay
	b.relay = nil
	if err := p.stop(35 * time.Second); err != nil {
		return fmt.Errorf("%w\nrelay log (last lines):\n%s", err, p.tail(20))
	}
	return nil
}

// relayAlive fails if the relay has exited on its own.
func (b *bench) relayAlive() error {
	if b.relay == nil {
		return errors.New("relay not running")
	}
	if done, err := b.relay.exited(); done {
		return fmt.Errorf("the relay exited unexpectedly (%v)\nrelay log (last lines):\n%s", err, b.relay.tail(30))
	}
	return nil
}

func (b *bench) createSlot(ctx context.Context) error {
	logf("first start of the relay: creating slot %s", b.name)
	if err := b.startRelay(); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := b.relayAlive(); err != nil {
			return err
		}
		var active, pending bool
		err := b.pool.QueryRow(ctx, `SELECT
			EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active),
			EXISTS (SELECT 1 FROM outbox_relay_slot_state WHERE slot_name = $1 AND sweep_pending)`, b.name).Scan(&active, &pending)
		if err != nil {
			return fmt.Errorf("wait for the slot: %w", err)
		}
		if active && !pending {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the relay did not create and stream from slot %s within 60 s\nrelay log:\n%s", b.name, b.relay.tail(30))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	time.Sleep(300 * time.Millisecond)
	return b.stopRelay()
}

// drainRun is one backlog drain (the relay's or the polling design's).
type drainRun struct {
	Events          int     `json:"events"`
	Seconds         float64 `json:"seconds"`      // start → all received and all marked
	Rate            float64 `json:"events_per_s"` // Events / Seconds
	ReceivedSeconds float64 `json:"received_seconds"`
	StartupSeconds  float64 `json:"startup_seconds"`          // start → first event received
	StreamRate      float64 `json:"events_per_s_after_first"` // excluding startup
	CPUSeconds      float64 `json:"cpu_seconds,omitempty"`
	CPUPer1000ms    float64 `json:"cpu_ms_per_1000_events,omitempty"`
	Cores           float64 `json:"cpu_cores,omitempty"`
	PeakRSSMiB      float64 `json:"peak_rss_mib,omitempty"`
	Duplicates      int64   `json:"duplicates"`
	Reorders        int64   `json:"reorders"`
	Mode            string  `json:"on_published,omitempty"`
	Cost            dbCost  `json:"database_cost"`
}

func (b *bench) relayDrain(ctx context.Context, i int, mode string) (drainRun, error) {
	o := b.opt
	name := fmt.Sprintf("relay drain (%s), run %d", mode, i+1)
	if err := b.stopRelay(); err != nil {
		return drainRun{}, err
	}
	b.mode = mode
	before, err := b.readCost(ctx)
	if err != nil {
		return drainRun{}, err
	}
	t := newTracker(name, o.N, 1)
	phase := b.nextPhase(t)
	logf("%s: inserting %d rows (%d per transaction) with the relay stopped", name, o.N, o.BacklogTxRows)
	err = insertBacklog(ctx, b.dbURL, b.tag, phase, o.N, o.BacklogTxRows, o.PadBytes, func(done int) {
		logf("%s: inserted %d/%d", name, done, o.N)
	})
	if err != nil {
		return drainRun{}, err
	}
	if left, err := countUnpublished(ctx, b.pool); err != nil || left != int64(o.N) {
		return drainRun{}, fmt.Errorf("%s: %d unpublished rows before the start, want %d (%v)", name, left, o.N, err)
	}
	inserted, err := b.readCost(ctx)
	if err != nil {
		return drainRun{}, err
	}
	start := nowNs()
	if err := b.startRelay(); err != nil {
		return drainRun{}, err
	}
	logf("%s: relay started (pid %d)", name, b.relay.pid())
	err = b.cons.waitAll(ctx, t, int64(o.N), o.Stall, func(got int64) {
		el := time.Duration(nowNs() - start).Seconds()
		logf("%s: received %d/%d (%.0f events/s)", name, got, o.N, float64(got)/el)
		if err := b.relayAlive(); err != nil {
			logf("%v", err)
		}
	})
	if err != nil {
		return drainRun{}, b.lossReport(ctx, t, phase, o.N, err)
	}
	received := nowNs()
	if err := waitMarked(ctx, b.pool, o.Stall, func(left int64) { logf("%s: %d rows not yet marked", name, left) }); err != nil {
		return drainRun{}, fmt.Errorf("%s: %w", name, err)
	}
	end := nowNs()
	drained, err := b.readCost(ctx)
	if err != nil {
		return drainRun{}, err
	}
	cost, err := b.cost(ctx, o.N, before, inserted, drained)
	if err != nil {
		return drainRun{}, err
	}
	cpu, err := b.relay.cpu()
	if err != nil {
		return drainRun{}, fmt.Errorf("relay CPU: %w", err)
	}
	rss, err := b.relay.peakRSS()
	if err != nil {
		return drainRun{}, fmt.Errorf("relay RSS: %w", err)
	}
	last := int64(0)
	for _, r := range t.recv {
		last = max(last, r)
	}
	d := drainRun{
		Events:          o.N,
		Seconds:         time.Duration(end - start).Seconds(),
		ReceivedSeconds: time.Duration(last - start).Seconds(),
		StartupSeconds:  time.Duration(t.firstNs.Load() - start).Seconds(),
		CPUSeconds:      cpu.Seconds(),
		PeakRSSMiB:      float64(rss) / (1 << 20),
		Duplicates:      t.dups.Load(),
		Reorders:        t.reorders.Load(),
		Mode:            mode,
		Cost:            cost,
	}
	_ = received
	d.Rate = float64(o.N) / d.Seconds
	d.StreamRate = float64(o.N-1) / (d.Seconds - d.StartupSeconds)
	d.CPUPer1000ms = d.CPUSeconds / float64(o.N) * 1000 * 1000
	d.Cores = d.CPUSeconds / d.Seconds
	logf("%s: %.0f events/s (%.2f s; first event after %.0f ms; relay CPU %.2f s = %.2f ms per 1,000 events; peak RSS %.1f MiB; dups %d, reorders %d)",
		name, d.Rate, d.Seconds, d.StartupSeconds*1000, d.CPUSeconds, d.CPUPer1000ms, d.PeakRSSMiB, d.Duplicates, d.Reorders)
	logCost(name, cost)
	return d, nil
}

// lossReport turns a wait failure into a loud report of what is missing.
func (b *bench) lossReport(ctx context.Context, t *tracker, phase, n int, cause error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	count, first := t.missing(n, 10)
	var rl string
	if b.relay != nil {
		rl = "\nrelay log (last lines):\n" + b.relay.tail(20)
	}
	return fmt.Errorf("%w\n%s: %d of %d events never received; first missing:\n%s%s",
		cause, t.name, count, n, describeMissing(context.Background(), b.pool, b.tag, phase, first), rl)
}

// idleResult: what the relay asks of the database while the outbox is idle.
type idleResult struct {
	Seconds          float64 `json:"seconds"`
	XactCommit       int64   `json:"xact_commit_delta"`
	XactRollback     int64   `json:"xact_rollback_delta"`
	QueriesPerSecond float64 `json:"queries_per_s"` // xact_commit delta / s
	QueriesSeen      int     `json:"relay_queries_seen_in_pg_stat_activity"`
	Method           string  `json:"method"`
}

// measureIdle counts the transactions committed in the bench database while
// only the relay is connected to it and nothing is written. The bench's
// own connections are closed first (a backend flushes its statistics when
// it exits). pg_stat_database counts transactions; the relay's replication
// connection commits none while idle. As a second witness, pg_stat_activity
// is sampled every 50 ms for a new query_start on the relay's pool
// connections.
func (b *bench) measureIdle(ctx context.Context) (idleResult, error) {
	o := b.opt
	if err := b.relayAlive(); err != nil {
		return idleResult{}, err
	}
	b.pool.Reset()
	logf("idle: watching the relay's queries for %s with the outbox idle", o.IdleDuration)
	time.Sleep(time.Second)
	read := func() (int64, int64, error) {
		var c, r int64
		err := b.admin.QueryRow(ctx, `SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1`, b.name).Scan(&c, &r)
		return c, r, err
	}
	c0, r0, err := read()
	if err != nil {
		return idleResult{}, err
	}
	start := time.Now()
	seen := map[int32]time.Time{}
	queries := 0
	first := true
	for time.Since(start) < o.IdleDuration {
		rows, err := b.admin.Query(ctx, `SELECT pid, query_start FROM pg_stat_activity
			WHERE datname = $1 AND backend_type = 'client backend' AND application_name = 'outbox-relay' AND query_start IS NOT NULL`, b.name)
		if err != nil {
			return idleResult{}, err
		}
		for rows.Next() {
			var pid int32
			var qs time.Time
			if err := rows.Scan(&pid, &qs); err != nil {
				rows.Close()
				return idleResult{}, err
			}
			if prev, ok := seen[pid]; (ok && !prev.Equal(qs)) || (!ok && !first) {
				queries++
			}
			seen[pid] = qs
		}
		rows.Close()
		first = false
		select {
		case <-ctx.Done():
			return idleResult{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	el := time.Since(start).Seconds()
	c1, r1, err := read()
	if err != nil {
		return idleResult{}, err
	}
	if err := b.relayAlive(); err != nil {
		return idleResult{}, err
	}
	res := idleResult{
		Seconds: el, XactCommit: c1 - c0, XactRollback: r1 - r0, QueriesSeen: queries,
		QueriesPerSecond: float64(c1-c0) / el,
		Method:           "pg_stat_database.xact_commit delta in the bench database (pg_stat_statements is not preloaded); cross-checked with pg_stat_activity.query_start of the relay's pool connections every 50 ms",
	}
	logf("idle: %d transactions committed in %.1f s (%.2f/s); %d relay queries seen in pg_stat_activity; %d rollbacks",
		res.XactCommit, el, res.QueriesPerSecond, queries, res.XactRollback)
	return res, nil
}

// latencyRun is one steady-load measurement.
type latencyRun struct {
	loadResult
	// From the relay's outbox_relay_stream_delay_seconds: commit timestamp
	// -> first event received, the database's share of the latency.
	StreamP50ms float64 `json:"stream_delay_p50_ms,omitempty"`
	StreamP99ms float64 `json:"stream_delay_p99_ms,omitempty"`
	P50ms       float64 `json:"p50_ms"`
	P95ms       float64 `json:"p95_ms"`
	P99ms       float64 `json:"p99_ms"`
	Maxms       float64 `json:"max_ms"`
	Producers   int     `json:"producers"`
	Events      int     `json:"events"`
	Early       int     `json:"received_before_commit_returned"`
	RelayCores  float64 `json:"relay_cpu_cores,omitempty"`
	Duplicates  int64   `json:"duplicates"`
	Reorders    int64   `json:"reorders"`
	samples     []int64
}

// streamDelay is the relay's histogram of commit -> received.
const streamDelay = "outbox_relay_stream_delay_seconds"

func (b *bench) latency(ctx context.Context, design string, rate float64, k, rep int) error {
	o := b.opt
	name := fmt.Sprintf("%s latency, %.0f events/s, %d per transaction, run %d", design, rate, k, rep+1)
	producers := o.Producers
	if producers == 0 {
		producers = min(32, max(4, int(math.Ceil(rate/float64(k)/250))))
	}
	interval := float64(k*producers) / rate
	perProducer := int(o.LatencyDuration.Seconds()/interval) + 2
	t := newTracker(name, perProducer*k*producers, producers)
	phase := b.nextPhase(t)
	logf("%s: %s from %d connections", name, o.LatencyDuration, producers)
	var cpu0 time.Duration
	var delay0 []bucket
	if strings.HasPrefix(design, "relay") {
		if err := b.relayAlive(); err != nil {
			return err
		}
		var err error
		if cpu0, err = b.relay.cpu(); err != nil {
			return err
		}
		if delay0, err = histogram(b.metricsURL, streamDelay); err != nil {
			// Diagnostic only: the run goes on without the column.
			logf("%s: %v", name, err)
		}
	}
	w0 := time.Now()
	lr, err := runLoad(ctx, b.dbURL, t, b.tag, phase, rate, k, producers, o.LatencyDuration, o.PadBytes, func(c int64) {
		logf("%s: committed %d, received %d", name, c, t.distinct.Load())
	})
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := b.cons.waitAll(ctx, t, lr.Committed, o.Stall, func(got int64) {
		logf("%s: committed %d, received %d", name, lr.Committed, got)
	}); err != nil {
		return b.lossReport(ctx, t, phase, len(t.recv), err)
	}
	run := latencyRun{loadResult: lr, Producers: producers, Events: int(lr.Committed)}
	if strings.HasPrefix(design, "relay") {
		cpu1, err := b.relay.cpu()
		if err != nil {
			return err
		}
		run.RelayCores = (cpu1 - cpu0).Seconds() / time.Since(w0).Seconds()
		// Every transaction reached the consumer, so the relay has
		// observed each one's stream delay by now.
		if delay0 != nil {
			if delay1, err := histogram(b.metricsURL, streamDelay); err != nil {
				logf("%s: %v", name, err)
			} else {
				run.StreamP50ms = finite(1000 * quantile(delay0, delay1, 0.50))
				run.StreamP99ms = finite(1000 * quantile(delay0, delay1, 0.99))
			}
		}
	}
	if err := waitMarked(ctx, b.pool, o.Stall, nil); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	lat, early, lost := t.latencies()
	if lost > 0 || int64(len(lat)) != lr.Committed {
		return fmt.Errorf("%s: LOSS: %d committed events not received", name, lost)
	}
	run.samples = lat
	run.Early = early
	run.P50ms = pct(lat, 0.50)
	run.P95ms = pct(lat, 0.95)
	run.P99ms = pct(lat, 0.99)
	run.Maxms = float64(lat[len(lat)-1]) / 1e6
	run.Duplicates = t.dups.Load()
	run.Reorders = t.reorders.Load()
	logf("%s: achieved %.0f events/s; p50 %.2f ms, p95 %.2f ms, p99 %.2f ms, max %.2f ms; relay CPU %.3f cores; dups %d, reorders %d",
		name, lr.Achieved, run.P50ms, run.P95ms, run.P99ms, run.Maxms, run.RelayCores, run.Duplicates, run.Reorders)
	if strings.HasPrefix(design, "relay") {
		logf("%s: commit -> received by the relay (its histogram): p50 %.2f ms, p99 %.2f ms", name, run.StreamP50ms, run.StreamP99ms)
	}
	b.res.addLatency(design, rate, k, run)
	return nil
}

// pct is the nearest-rank percentile of sorted nanoseconds, in ms.
func pct(sorted []int64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	i = max(0, min(i, len(sorted)-1))
	return float64(sorted[i]) / 1e6
}

func (b *bench) polling(ctx context.Context) error {
	o := b.opt
	pool, err := newPool(ctx, b.dbURL, "outbox-relay-bench polling design", 5)
	if err != nil {
		return err
	}
	defer pool.Close()
	pub, err := connectPublisher(o.AMQPURL, b.pollQueue())
	if err != nil {
		return fmt.Errorf("polling design: connect: %w", err)
	}
	defer pub.conn.Close()

	for i := 0; i < o.PollRepeat && o.PollN > 0; i++ {
		name := fmt.Sprintf("polling drain, run %d", i+1)
		t := newTracker(name, o.PollN, 1)
		phase := b.nextPhase(t)
		logf("%s: inserting %d rows; at about 200 events/s this takes about %.0f s", name, o.PollN, float64(o.PollN)/200)
		before, err := b.readCost(ctx)
		if err != nil {
			return err
		}
		if err := insertBacklog(ctx, b.dbURL, b.tag, phase, o.PollN, o.BacklogTxRows, o.PadBytes, nil); err != nil {
			return err
		}
		inserted, err := b.readCost(ctx)
		if err != nil {
			return err
		}
		start := nowNs()
		b.poller = spawnPollingProcessor(ctx, pool, pub)
		err = b.cons.waitAll(ctx, t, int64(o.PollN), o.Stall, func(got int64) {
			el := time.Duration(nowNs() - start).Seconds()
			logf("%s: received %d/%d (%.0f events/s)", name, got, o.PollN, float64(got)/el)
		})
		if err != nil {
			return b.lossReport(ctx, t, phase, o.PollN, err)
		}
		if err := waitMarked(ctx, b.pool, o.Stall, nil); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		end := nowNs()
		b.poller.stop()
		b.poller = nil
		drained, err := b.readCost(ctx)
		if err != nil {
			return err
		}
		cost, err := b.cost(ctx, o.PollN, before, inserted, drained)
		if err != nil {
			return err
		}
		logCost(name, cost)
		d := drainRun{
			Events:         o.PollN,
			Seconds:        time.Duration(end - start).Seconds(),
			StartupSeconds: time.Duration(t.firstNs.Load() - start).Seconds(),
			Duplicates:     t.dups.Load(),
			Reorders:       t.reorders.Load(),
			Mode:           "mark",
			Cost:           cost,
		}
		last := int64(0)
		for _, r := range t.recv {
			last = max(last, r)
		}
		d.ReceivedSeconds = time.Duration(last - start).Seconds()
		d.Rate = float64(o.PollN) / d.Seconds
		d.StreamRate = float64(o.PollN-1) / (d.Seconds - d.StartupSeconds)
		logf("%s: %.1f events/s (%.1f s)", name, d.Rate, d.Seconds)
		b.res.Poll = append(b.res.Poll, d)
	}

	// Its latency is bounded by the 500 ms tick, so it is measured
	// -poll-repeat times, not -repeat times, to keep the run short.
	b.poller = spawnPollingProcessor(ctx, pool, pub)
	for rep := 0; rep < o.PollRepeat; rep++ {
		if err := b.latency(ctx, "polling", o.PollRate, 1, rep); err != nil {
			return err
		}
	}
	b.poller.stop()
	if b.poller.given > 0 {
		return fmt.Errorf("polling design gave up on %d events", b.poller.given)
	}
	b.poller = nil
	return nil
}

// finalChecks: every row ever written is marked, and every phase received
// every event.
func (b *bench) finalChecks(ctx context.Context) error {
	var total, unpublished int64
	err := b.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM outbox_events`).Scan(&total, &unpublished)
	if err != nil {
		return err
	}
	c := checks{RowsWritten: total, RowsUnmarked: unpublished, Stray: b.cons.stray.Load()}
	var problems []string
	for _, t := range b.trackers {
		n := len(t.recv)
		expect := n
		if t.streams > 1 { // steady loads: only the committed sequence numbers
			expect = 0
			for i := range t.commit {
				if t.commit[i] != 0 {
					expect++
				}
			}
		}
		pc := phaseCheck{Phase: t.name, Expected: int64(expect), Received: t.distinct.Load(), Duplicates: t.dups.Load(), Reorders: t.reorders.Load(), OutOfRange: t.outOfRange.Load()}
		c.Phases = append(c.Phases, pc)
		c.Lost += pc.Expected - pc.Received
		c.Duplicates += pc.Duplicates
		if pc.Received != pc.Expected {
			problems = append(problems, fmt.Sprintf("%s: received %d of %d", t.name, pc.Received, pc.Expected))
		}
		if strings.HasPrefix(t.name, "relay") {
			c.RelayReorders += pc.Reorders
		}
	}
	b.res.Checks = c
	if unpublished != 0 {
		problems = append(problems, fmt.Sprintf("%d rows are not marked published", unpublished))
	}
	if len(problems) > 0 {
		return fmt.Errorf("LOSS: %s", strings.Join(problems, "; "))
	}
	logf("checks: %d rows left in the table, none unpublished; %d events lost; %d duplicates; %d relay reorders; %d stray messages",
		total, c.Lost, c.Duplicates, c.RelayReorders, c.Stray)
	return nil
}

// cleanup removes everything the run created, in reverse order of setup:
// processes, broker objects, then the slot before the database.
func (b *bench) cleanup() error {
	var errs []error
	if b.poller != nil {
		b.poller.stop()
	}
	if b.relay != nil {
		if err := b.stopRelay(); err != nil {
			errs = append(errs, err)
		}
	}
	if b.cons != nil {
		b.cons.close()
	}
	if b.pool != nil {
		b.pool.Close()
	}
	if b.opt.Keep {
		logf("-keep: leaving database %s, slot %s and the %s.* exchanges and queues", b.name, b.name, b.name)
		return errors.Join(errs...)
	}
	if b.topology {
		ch := b.amqpCh
		if ch == nil || ch.IsClosed() {
			var err error
			if ch, err = b.amqpConn.Channel(); err != nil {
				errs = append(errs, fmt.Errorf("RabbitMQ cleanup: %w", err))
			}
		}
		if ch != nil {
			for _, q := range []string{b.queue(), b.pollQueue(), b.deadLetter()} {
				if _, err := ch.QueueDelete(q, false, false, false); err != nil {
					errs = append(errs, fmt.Errorf("delete queue %s: %w", q, err))
					ch, _ = b.amqpConn.Channel()
				}
			}
			for _, x := range []string{b.exchange(), b.deadLetter()} {
				if ch == nil {
					break
				}
				if err := ch.ExchangeDelete(x, false, false); err != nil {
					errs = append(errs, fmt.Errorf("delete exchange %s: %w", x, err))
					ch, _ = b.amqpConn.Channel()
				}
			}
		}
		b.amqpConn.Close()
	}
	if b.dbCreated {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		// A fresh connection: an interrupted query closes the old one.
		admin, err := connect(ctx, b.opt.DatabaseURL, "outbox-relay-bench cleanup")
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup: connect: %w (drop database %s and slot %s by hand)", err, b.name, b.name))
		} else {
			if err := dropBenchDatabase(ctx, admin, b.name, b.name); err != nil {
				errs = append(errs, err)
			} else {
				logf("dropped slot and database %s, deleted its exchanges and queues", b.name)
			}
			admin.Close(context.Background())
		}
	}
	if b.admin != nil {
		b.admin.Close(context.Background())
	}
	if b.tmp != "" {
		// Keep the relay's log next to the results: it explains slow runs.
		if log, err := os.ReadFile(filepath.Join(b.tmp, "relay.log")); err == nil && b.opt.JSONPath != "" {
			dst := filepath.Join(filepath.Dir(b.opt.JSONPath), "relay.log")
			if os.MkdirAll(filepath.Dir(dst), 0o755) == nil && os.WriteFile(dst, log, 0o644) == nil {
				logf("relay log: %s", dst)
			}
		}
		os.RemoveAll(b.tmp)
	}
	return errors.Join(errs...)
}
