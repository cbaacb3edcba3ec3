package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/internal/pgsession"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// env is one integration test's private world: database, slot, exchanges
// and a queue bound to everything the relay publishes.
type env struct {
	t       *testing.T
	dbURL   string
	amqpURL string
	cfg     *config.Config
	pool    *pgxpool.Pool // the test's own, as an application's
	// relayPool is the relay's, configured as `outbox-relay run` does
	// (internal/pgsession): built on first start, with the bounds then set.
	relayPool *pgxpool.Pool
	amqp      *amqp.Connection
	queue     string

	mu       sync.Mutex
	received []amqp.Delivery // only while keep is true
	order    []string        // message ids in arrival order
	ids      map[string]int  // message_id -> times received
	keep     bool
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testenv.Integration(t)
	return newEnvAt(t, testenv.Postgres(t))
}

// newEnvAt is newEnv on a database the test provides (a cluster of its own).
func newEnvAt(t *testing.T, dbURL string) *env {
	t.Helper()
	e := &env{t: t, dbURL: dbURL, amqpURL: testenv.AMQP(t), ids: map[string]int{}, keep: true}
	e.cfg = &config.Config{
		DatabaseURL:        e.dbURL,
		AMQPURL:            e.amqpURL,
		Slot:               testenv.Slot(t, e.dbURL),
		Publication:        "outbox_relay_pub",
		Table:              "public.outbox_events",
		Exchange:           testenv.Name(t, "ex"),
		RoutingKey:         "{aggregate_type}.{event_type}",
		DeadLetterExchange: testenv.Name(t, "dlx"),
		Unroutable:         "dead-letter",
		LogLevel:           "info",
		LogFormat:          "console",
		OnPublished:        config.OnPublishedMark,
		PublishWindow:      1000,
		MarkBatchSize:      500,
		MaxInflightBytes:   64 << 20,
		StatusInterval:     100 * time.Millisecond,
		BackoffMin:         50 * time.Millisecond,
		BackoffMax:         time.Second,
		ShutdownTimeout:    20 * time.Second,
		MaxMessageBytes:    16 << 20,
		AMQPHeartbeat:      10 * time.Second,
		PostgresTimeout:    30 * time.Second,
		WaitForSyncStandby: true, // the default
	}
	if err := e.cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := migrations.Apply(ctx, conn, migrations.Target{Schema: "public", Table: "outbox_events", Publication: "outbox_relay_pub"}); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	if e.pool, err = pgxpool.New(ctx, e.dbURL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.pool.Close)
	if _, err := e.pool.Exec(ctx, `CREATE TABLE other (id serial PRIMARY KEY, v text)`); err != nil {
		t.Fatal(err)
	}

	if e.amqp, err = amqp.Dial(e.amqpURL); err != nil {
		t.Fatal(err)
	}
	ch, err := e.amqp.Channel()
	if err != nil {
		t.Fatal(err)
	}
	e.queue = testenv.Name(t, "q")
	must(t, ch.ExchangeDeclare(e.cfg.Exchange, "topic", true, false, false, false, nil))
	_, err = ch.QueueDeclare(e.queue, false, false, false, false, nil)
	must(t, err)
	must(t, ch.QueueBind(e.queue, "#", e.cfg.Exchange, false, nil))
	must(t, ch.Qos(2000, 0, false))
	deliveries, err := ch.Consume(e.queue, "", true, false, false, false, nil)
	must(t, err)
	go func() {
		for d := range deliveries {
			e.mu.Lock()
			e.ids[d.MessageId]++
			e.order = append(e.order, d.MessageId)
			if e.keep {
				e.received = append(e.received, d)
			}
			e.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		if ch, err := e.amqp.Channel(); err == nil {
			_, _ = ch.QueueDelete(e.queue, false, false, false)
			_, _ = ch.QueueDelete(e.cfg.DeadLetterExchange, false, false, false)
			_ = ch.ExchangeDelete(e.cfg.Exchange, false, false)
			_ = ch.ExchangeDelete(e.cfg.DeadLetterExchange, false, false)
		}
		e.amqp.Close()
	})
	return e
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// running is a relay started by a test.
type running struct {
	cancel  context.CancelFunc
	done    chan error
	metrics *metrics.Metrics
}

// start runs a relay in-process. wrap, if given, wraps its publisher.
func (e *env) start(wrap func(sink.Publisher) sink.Publisher) *running {
	e.t.Helper()
	return e.startWith(nil, wrap)
}

// startWith is start with a look at the Relay before it runs.
func (e *env) startWith(inspect func(*Relay), wrap func(sink.Publisher) sink.Publisher) *running {
	e.t.Helper()
	replCfg, err := replication.Config(e.dbURL, "outbox-relay-test")
	must(e.t, err)
	m := metrics.New()
	log := zerolog.New(zerolog.NewTestWriter(e.t)).With().Timestamp().Logger().Level(zerolog.InfoLevel)
	cfg := *e.cfg
	r, err := New(Options{
		Config: &cfg, Pool: e.relaysPool(), Log: log, Metrics: m, Replication: replCfg,
		StandbyRetry: 200 * time.Millisecond,
		NewPublisher: func(ctx context.Context) (sink.Publisher, error) {
			p, err := sink.DialRabbitMQ(ctx, sink.RabbitMQConfig{URL: cfg.AMQPURL, Exchange: cfg.Exchange,
				DeadLetterExchange: cfg.DeadLetterExchange, MaxMessageBytes: cfg.MaxMessageBytes, Heartbeat: cfg.AMQPHeartbeat})
			if err != nil || wrap == nil {
				return p, err
			}
			return wrap(p), nil
		},
	})
	must(e.t, err)
	if inspect != nil {
		inspect(r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rr := &running{cancel: cancel, done: make(chan error, 1), metrics: m}
	go func() { rr.done <- r.Run(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		<-rr.done
		rr.done <- nil
	})
	return rr
}

// relaysPool returns the pool the relay uses, built as the binary builds it.
func (e *env) relaysPool() *pgxpool.Pool {
	e.t.Helper()
	if e.relayPool != nil {
		return e.relayPool
	}
	pc, err := pgsession.PoolConfig(e.dbURL, 4, pgsession.Bounds{Statement: e.cfg.PostgresTimeout})
	must(e.t, err)
	e.relayPool, err = pgxpool.NewWithConfig(context.Background(), pc)
	must(e.t, err)
	e.t.Cleanup(e.relayPool.Close)
	return e.relayPool
}

// waitStreaming waits until the relay reports ready (streaming).
func (r *running) waitStreaming(t testing.TB) {
	t.Helper()
	waitFor(t, 15*time.Second, "the relay to stream", func() bool { return r.metrics.Ready() == "" })
}

// stop asks the relay to stop (as SIGTERM does) and waits for Run.
func (r *running) stop(t testing.TB) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("Run returned %v after stop", err)
		}
		r.done <- nil // later stops and cleanup return at once
	case <-time.After(30 * time.Second):
		t.Fatal("relay did not stop within 30s")
	}
}

// event is one row a test inserts.
type event struct {
	ID, AggregateType, AggregateID, EventType, Payload string
}

var seq int

func newEvent(aggType, evType, payload string) event {
	seq++
	return event{
		ID:            fmt.Sprintf("00000000-0000-4000-8000-%012d", seq),
		AggregateType: aggType,
		AggregateID:   fmt.Sprintf("10000000-0000-4000-8000-%012d", seq%7),
		EventType:     evType,
		Payload:       payload,
	}
}

// insertTx inserts events in one transaction with the producer package,
// two at a time with extra (writes elsewhere) in between, and commits or
// rolls back.
func (e *env) insertTx(events []event, commit bool, extra func(pgx.Tx) error) {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	must(e.t, err)
	for i := 0; i < len(events); i += 2 {
		var batch []outbox.Event
		for _, ev := range events[i:min(i+2, len(events))] {
			batch = append(batch, outbox.Event{ID: ev.ID, AggregateType: ev.AggregateType, AggregateID: ev.AggregateID,
				EventType: ev.EventType, Payload: json.RawMessage(ev.Payload)})
		}
		must(e.t, outbox.Insert(ctx, tx, batch...))
		if extra != nil {
			must(e.t, extra(tx))
		}
	}
	if commit {
		must(e.t, tx.Commit(ctx))
	} else {
		must(e.t, tx.Rollback(ctx))
	}
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *env) receivedCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.order)
}

func (e *env) receivedIDs() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.order...)
}

func (e *env) deliveries() []amqp.Delivery {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]amqp.Delivery(nil), e.received...)
}

func (e *env) waitReceived(n int, timeout time.Duration) {
	e.t.Helper()
	waitFor(e.t, timeout, fmt.Sprintf("%d messages", n), func() bool { return e.receivedCount() >= n })
}

// unpublished counts rows not yet marked.
func (e *env) unpublished() int {
	e.t.Helper()
	var n int
	schema, table, err := config.SplitTable(e.cfg.Table)
	must(e.t, err)
	must(e.t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM `+pgx.Identifier{schema, table}.Sanitize()+
		` WHERE published_at IS NULL`).Scan(&n))
	return n
}

// currentLSN returns pg_current_wal_lsn().
func (e *env) currentLSN() string {
	e.t.Helper()
	var lsn string
	must(e.t, e.pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()::text`).Scan(&lsn))
	return lsn
}

// slotPast reports whether the slot's confirmed_flush_lsn is at or past lsn.
func (e *env) slotPast(lsn string) bool {
	e.t.Helper()
	var ok *bool
	err := e.pool.QueryRow(context.Background(),
		`SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`, e.cfg.Slot, lsn).Scan(&ok)
	if errors.Is(err, pgx.ErrNoRows) {
		return false
	}
	must(e.t, err)
	return ok != nil && *ok
}

// waitPublishingStops waits until count has stood still for rounds checks
// 200 ms apart (and, with nonzero, is above zero): the relay has read what
// it may while the broker confirms nothing.
func (e *env) waitPublishingStops(count func() int, rounds int, nonzero bool) {
	e.t.Helper()
	last, still := -1, 0
	waitFor(e.t, 90*time.Second, "the relay to stop publishing", func() bool {
		time.Sleep(200 * time.Millisecond)
		now := count()
		if now == last && (now > 0 || !nonzero) {
			still++
		} else {
			last, still = now, 0
		}
		return still >= rounds
	})
}

// checkReceivedInOrder waits for every row to be marked and every id to
// arrive, then checks that exactly ids arrived, in that order.
func (e *env) checkReceivedInOrder(ids []string) {
	e.t.Helper()
	waitFor(e.t, 2*time.Minute, "all rows marked", func() bool { return e.unpublished() == 0 })
	e.waitReceived(len(ids), time.Minute)
	time.Sleep(200 * time.Millisecond) // a duplicate would be right behind
	got := e.receivedIDs()
	if len(got) != len(ids) {
		e.t.Fatalf("received %d messages, want %d", len(got), len(ids))
	}
	for i, id := range ids {
		if got[i] != id {
			e.t.Fatalf("message %d is %s, want %s", i, got[i], id)
		}
	}
}

// bindOnly rebinds the test's queue to the relay's exchange with pattern
// alone, so that other routing keys are unroutable, and returns the
// channel for further bindings.
func (e *env) bindOnly(pattern string) *amqp.Channel {
	e.t.Helper()
	ch, err := e.amqp.Channel()
	must(e.t, err)
	must(e.t, ch.QueueUnbind(e.queue, "#", e.cfg.Exchange, nil))
	must(e.t, ch.QueueBind(e.queue, pattern, e.cfg.Exchange, false, nil))
	return ch
}

// dlq returns the messages in the dead-letter queue.
func (e *env) dlq() []amqp.Delivery {
	e.t.Helper()
	ch, err := e.amqp.Channel()
	must(e.t, err)
	defer ch.Close()
	var out []amqp.Delivery
	for {
		d, ok, err := ch.Get(e.cfg.DeadLetterExchange, true)
		must(e.t, err)
		if !ok {
			return out
		}
		out = append(out, d)
	}
}
