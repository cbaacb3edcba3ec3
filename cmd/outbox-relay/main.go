// Command outbox-relay streams a PostgreSQL transactional outbox to RabbitMQ
// through a logical replication slot. See the README for the contract.
//
// This file is wiring only: configuration, logging, signals and the
// constructors of each stage; the engine is package relay.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	_ "net/http/pprof" // served only on RELAY_PPROF_ADDR
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/internal/pgsession"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
	"github.com/outbox-relay/outbox-relay/status"
	"github.com/outbox-relay/outbox-relay/tracing"
)

// version is set with -ldflags "-X main.version=…"; otherwise the module's.
var version = ""

const usage = `usage: outbox-relay [command] [flags]

commands:
  run       stream the outbox to RabbitMQ (the default)
  migrate   create or upgrade the outbox table, index and publication
  status    show the slot, publication and unpublished rows (--json)
  prune     delete published rows older than --older-than, in batches
  version   print the version

Configuration is read from RELAY_* environment variables; see the README.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	switch {
	case len(args) > 0 && (args[0] == "-h" || args[0] == "--help"):
		cmd = "help" // not run's flags: the whole usage
	case len(args) > 0 && args[0] != "" && args[0][0] != '-':
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return cmdRun(args, stderr)
	case "migrate":
		return cmdMigrate(args, stdout, stderr)
	case "status":
		return cmdStatus(args, stdout, stderr)
	case "prune":
		return cmdPrune(args, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "outbox-relay", versionString())
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "outbox-relay: unknown command %q\n\n%s", cmd, usage)
	return 2
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// loadConfig reads the environment; tools need only the database.
func loadConfig(stderr io.Writer, forTools bool) (*config.Config, bool) {
	if err := config.ReadSecretFiles("RELAY_DATABASE_URL", "RELAY_AMQP_URL", "RELAY_NATS_URL"); err != nil {
		fmt.Fprintf(stderr, "outbox-relay: configuration: %v\n", err)
		return nil, false
	}
	load := config.Load
	if forTools {
		load = config.LoadForTools
	}
	cfg, err := load()
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay: invalid configuration:\n%v\n", err)
		return nil, false
	}
	return cfg, true
}

func newPool(ctx context.Context, cfg *config.Config, maxConns int32) (*pgxpool.Pool, error) {
	pc, err := pgsession.PoolConfig(cfg.DatabaseURL, maxConns, pgsession.Bounds{Statement: cfg.PostgresTimeout})
	if err != nil {
		return nil, err
	}
	return pgxpool.NewWithConfig(ctx, pc)
}

// pipelineProcs runs the relay on one processor unless GOMAXPROCS is set.
// The relay is one ordered pipeline (a replication stream, one channel)
// and uses well under a core, but each event passes between goroutines;
// with spare processors the Go scheduler wakes an idle thread for each
// handoff, which costs more than the work handed over. Measured with the
// bench on 2 cores: 22-27% less CPU per event, at 1,000 events/s and while
// draining, and a faster drain (docs/operating.md, "CPU").
func pipelineProcs() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0)
	}
	runtime.GOMAXPROCS(1)
	return 1
}

func cmdRun(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, ok := loadConfig(stderr, false)
	if !ok {
		return 2
	}
	log := cfg.Logger(stderr)
	procs := pipelineProcs()

	// First signal: stop reading, drain, acknowledge, exit 0.
	// Second signal: exit at once; nothing acknowledged is lost.
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-sigs
		log.Info().Str("signal", sig.String()).Msg("stopping: finishing in-flight events")
		stop()
		first := time.Now()
		// Some supervisors signal the whole process group, so one stop can
		// arrive twice at once; a person's second Ctrl-C comes later.
		for sig = range sigs {
			if time.Since(first) > 500*time.Millisecond {
				break
			}
		}
		log.Warn().Str("signal", sig.String()).Msg("second signal: exiting now; unacknowledged events will be replayed")
		os.Exit(1)
	}()

	log.Info().Str("version", versionString()).
		Str("database", config.Redact(cfg.DatabaseURL)).Str("sink", cfg.Sink).Str("amqp", config.RedactList(cfg.AMQPURL)).
		Str("slot", cfg.Slot).Str("publication", cfg.Publication).Str("table", cfg.Table).
		Str("exchange", cfg.Exchange).Int("gomaxprocs", procs).Msg("starting outbox-relay")

	m := metrics.New()
	if cfg.PprofAddr != "" {
		go func() {
			srv := &http.Server{Addr: cfg.PprofAddr, Handler: http.DefaultServeMux, ReadHeaderTimeout: 5 * time.Second}
			if err := srv.ListenAndServe(); err != nil {
				log.Error().Err(err).Str("addr", cfg.PprofAddr).Msg("pprof server (RELAY_PPROF_ADDR) failed")
			}
		}()
	}
	if cfg.MetricsAddr != "" {
		mctx, mstop := context.WithCancel(context.Background())
		defer mstop()
		go func() {
			if err := m.Serve(mctx, cfg.MetricsAddr); err != nil {
				log.Error().Err(err).Str("addr", cfg.MetricsAddr).Msg("metrics server (RELAY_METRICS_ADDR) failed")
			}
		}()
	}

	pool, err := newPool(ctx, cfg, 4)
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	defer pool.Close()
	defer startBackground(ctx, cfg, pool, m, log)() // retention and status poll, when configured
	replCfg, err := replication.Config(cfg.DatabaseURL, "outbox-relay")
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	tlsCfg, err := cfg.AMQPTLS()
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	// The relay's own spans, only with an OTLP endpoint in the environment.
	tr, err := tracing.Setup(ctx, tracing.Config{
		ServiceVersion: versionString(),
		OnError: func(err error, suppressed int) {
			log.Warn().Err(err).Int("suppressed", suppressed).Msg("OpenTelemetry: exporting the relay's spans failed")
		},
	})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	defer func() {
		if err := tr.Shutdown(5 * time.Second); err != nil {
			log.Warn().Err(err).Msg("OpenTelemetry: spans not flushed at exit")
		}
	}()
	if tr.Enabled() {
		log.Info().Str("endpoint", tr.Endpoint).Str("protocol", tr.Protocol).
			Msg("tracing on: a span per published event, linked to the producer's, exported over OTLP")
	} else {
		log.Info().Msg("tracing off: no OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	}
	// One list for every session: each dial after a lost connection
	// starts at the next node.
	amqpNodes := sink.NewNodes(cfg.AMQPURLs())
	if cfg.Sink != config.SinkNATS {
		var addrs []string
		for _, u := range cfg.AMQPURLs() {
			addrs = append(addrs, sink.NodeAddr(u))
		}
		m.AMQPNodes(addrs)
	}
	var dialNATS func(context.Context) (sink.Publisher, error)
	if cfg.Sink == config.SinkNATS {
		if dialNATS, err = natsPublisher(cfg); err != nil {
			log.Error().Err(err).Msg("cannot start")
			return 1
		}
	}
	r, err := relay.New(relay.Options{
		Config:      cfg,
		Pool:        pool,
		Log:         log,
		Metrics:     m,
		Replication: replCfg,
		Tracer:      tr.Tracer,
		NewPublisher: func(ctx context.Context) (sink.Publisher, error) {
			if dialNATS != nil {
				return dialNATS(ctx)
			}
			p, err := sink.DialRabbitMQ(ctx, sink.RabbitMQConfig{
				Nodes:               amqpNodes,
				Exchange:            cfg.Exchange,
				DeadLetterExchange:  cfg.DeadLetterExchange,
				DeadLetterQueueType: cfg.DeadLetterQueueType,
				MaxMessageBytes:     cfg.MaxMessageBytes,
				TLS:                 tlsCfg,
				Heartbeat:           cfg.AMQPHeartbeat,
				CloudEvents:         cfg.CloudEvents == config.CloudEventsBinary,
				CloudEventsSource:   cfg.CloudEventsSourceAttr(),
				OnConnection:        m.AMQPConnection,
				OnBlocked: func(blocked bool, reason string) {
					if !m.SetBrokerBlocked(blocked, reason) {
						return // another connection's notice of the same episode
					}
					if blocked {
						log.Warn().Str("reason", reason).Msg("RabbitMQ blocks publishing (connection.blocked); events wait until the alarm clears")
					} else {
						// reason is set when the blocked connection closed instead.
						log.Info().Str("reason", reason).Msg("RabbitMQ no longer blocks publishing (connection.unblocked)")
					}
				},
			})
			if err != nil {
				return nil, err
			}
			log.Info().Str("node", p.Node()).Msg("connected to RabbitMQ node")
			return p, nil
		},
	})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	if err := r.Run(ctx); err != nil {
		log.Error().Err(err).Msg("outbox-relay stopped")
		return 1
	}
	log.Info().Msg("outbox-relay stopped cleanly")
	return 0
}

func cmdMigrate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	layout := fs.String("layout", "", "table layout: default (the relay's table, created when missing), debezium "+
		"(Debezium's outbox table, created when missing) or existing (a table of your own, read through RELAY_COLUMNS). "+
		"Default: debezium when RELAY_COLUMNS starts with the debezium preset, existing when it maps columns, else default. "+
		"With debezium or existing an existing table keeps its columns: only published_at, relay_seq, the relay's tables and the publication are added")
	publishExisting := fs.Bool("publish-existing", false, "with --layout debezium or existing: rows already in the table are published by the relay's first sweep "+
		"(by default they count as published: whatever read the table before delivered them)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "outbox-relay migrate: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	cfg, ok := loadConfig(stderr, true)
	if !ok {
		return 2
	}
	spec := strings.TrimSpace(cfg.ColumnsSpec)
	debeziumColumns := strings.HasPrefix(spec, migrations.LayoutDebezium)
	switch *layout {
	case "":
		switch {
		case debeziumColumns:
			*layout = migrations.LayoutDebezium
		case spec != "" && spec != migrations.LayoutDefault:
			*layout = migrations.LayoutExisting
		default:
			*layout = migrations.LayoutDefault
		}
	case migrations.LayoutDefault, migrations.LayoutDebezium, migrations.LayoutExisting:
	default:
		fmt.Fprintf(stderr, "outbox-relay migrate: --layout %q is not one of %s, %s, %s\n", *layout,
			migrations.LayoutDefault, migrations.LayoutDebezium, migrations.LayoutExisting)
		return 2
	}
	if *publishExisting && *layout == migrations.LayoutDefault {
		fmt.Fprintln(stderr, "outbox-relay migrate: --publish-existing applies to --layout debezium or existing only (the default layout's rows are unpublished until marked)")
		return 2
	}
	if *publishExisting && cfg.TimeColumn() == "" {
		fmt.Fprintln(stdout, "note: the table has no event-time column (RELAY_COLUMNS occurred_at=): the rows already there have no insert order either, "+
			"and the first table sweep publishes them in id order, not per aggregate in the order they were written")
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	cc, err := pgx.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay migrate: RELAY_DATABASE_URL is not a valid PostgreSQL connection string")
		return 2
	}
	// The relay's own settings, not a DBA's defaults, but no statement
	// bound: building an index on a large table may take long. The
	// migrations bound their own lock waits (lock_timeout), so producers
	// never queue for long behind an ALTER TABLE that waits.
	pgsession.Pool(&cc.Config, pgsession.Bounds{})
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: connect to %s: %v\n", config.Redact(cfg.DatabaseURL), err)
		return 1
	}
	defer conn.Close(context.Background())
	schema, table, _ := config.SplitTable(cfg.Table)
	res, err := migrations.Apply(ctx, conn, migrations.Target{Schema: schema, Table: table, Publication: cfg.Publication,
		Layout: *layout, PublishExisting: *publishExisting})
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: %v\n", err)
		return 1
	}
	if *layout == migrations.LayoutDebezium && !debeziumColumns {
		fmt.Fprintln(stdout, "note: the table has Debezium's layout; run the relay with RELAY_COLUMNS=debezium")
	}
	if len(res.Applied) == 0 {
		fmt.Fprintf(stdout, "up to date at version %d (%s, publication %s)\n", res.Current, cfg.Table, cfg.Publication)
		return 0
	}
	for _, name := range res.Applied {
		fmt.Fprintf(stdout, "applied %s\n", name)
	}
	fmt.Fprintf(stdout, "now at version %d (%s, publication %s)\n", res.Current, cfg.Table, cfg.Publication)
	return 0
}

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	stuck := fs.Duration("stuck-after", 5*time.Minute, "exit 1 when the oldest unpublished row is older than this (0 disables)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, ok := loadConfig(stderr, true)
	if !ok {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := newPool(ctx, cfg, 1)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay status: %v\n", err)
		return 2
	}
	defer pool.Close()
	schema, table, _ := config.SplitTable(cfg.Table)
	rep, err := status.Gather(ctx, pool, cfg.Slot, cfg.Publication, schema, table, cfg.TimeColumn(), *stuck, cfg.SyncPublish)
	if err == nil {
		rep.Failover, err = status.ReadFailover(ctx, pool, cfg.DatabaseURL, cfg.Slot, cfg.FailoverSlot)
	}
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay status: %s: %v\n", config.Redact(cfg.DatabaseURL), err)
		return 1
	}
	if *asJSON {
		err = rep.WriteJSON(stdout)
	} else {
		err = rep.WriteText(stdout)
	}
	if err != nil {
		return 1
	}
	if len(rep.Problems) > 0 {
		return 1
	}
	return 0
}
