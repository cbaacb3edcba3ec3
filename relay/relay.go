package relay

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/sink"
)

// Options wires a Relay. Every dependency is injected by main.
type Options struct {
	Config  *config.Config
	Pool    *pgxpool.Pool
	Log     zerolog.Logger
	Metrics *metrics.Metrics
	// Replication is the replication connection's configuration.
	Replication *pgconn.Config
	// NewPublisher connects to the broker; it is called once per session.
	NewPublisher func(ctx context.Context) (sink.Publisher, error)
	// StandbyRetry is how often a standby relay tries to take the slot.
	StandbyRetry time.Duration
	// SyncCheckInterval is how often the relay reads whether its walsender
	// is a synchronous standby (syncstate.go); 15s when zero.
	SyncCheckInterval time.Duration
	// SyncStallLimit and SyncHoldOff are the step-aside guard's bounds
	// (syncstate.go, checkStall): 3s and 30s when zero.
	SyncStallLimit, SyncHoldOff time.Duration
	// NackPoisonAfter is how long an event's nacks must end session after
	// session (maxNackSessions of them) before it is dead-lettered
	// (pipeline.go, nackStreak): 5m when zero.
	NackPoisonAfter time.Duration
	// Tracer, when set, starts a span per published event, linked to the
	// producer's span (pipeline.go, startSpan). nil: no spans, no cost.
	Tracer trace.Tracer
}

// Relay streams the outbox until its context ends.
type Relay struct {
	opt        Options
	cfg        *config.Config
	log        zerolog.Logger
	m          *metrics.Metrics
	key        config.RoutingKey
	schema     string
	table      string
	tableIdent string
	// cols is the table's layout (RELAY_COLUMNS, RELAY_HEADER_COLUMNS),
	// layout the decoder's view of it.
	cols   decoder.Columns
	layout *decoder.Layout
	idCol  string // the id column, quoted
	// optional are the optional mapped columns (trace context) the table
	// has, as preflight found them: the sweep reads only those.
	optional map[string]bool
	streamed bool // a session has reached streaming at least once
	// progressed: the last session finished events, or lived a minute,
	// and did not end on nacks; only then is the reconnect backoff reset.
	progressed bool
	nackStreak nackStreak
	// carried holds ids the broker confirmed in a session that failed
	// before it could mark them. The next session marks them without
	// publishing them again: a broker or database hiccup causes no
	// duplicates, only a crash of the relay itself does.
	carried carrySet
	// stateSchemas is the schema of each of the relay's own tables, by
	// name (preflight, findStateTables).
	stateSchemas map[string]string
	// syncLogged is the sync state last logged, so that it is said once.
	syncLogged string

	// db and connect are the engine's collaborators (seams.go): the
	// Relay's own PostgreSQL methods and the replication connection,
	// unless a simulation replaced them.
	db      store
	connect func(ctx context.Context) (stream, error)
	// rand is the backoffs' jitter source; nil: math/rand/v2's.
	rand func(n int64) int64
}

// New validates the wiring and returns a Relay.
func New(opt Options) (*Relay, error) {
	if opt.Config == nil || opt.Pool == nil || opt.Replication == nil || opt.NewPublisher == nil {
		return nil, errors.New("relay: Config, Pool, Replication and NewPublisher are required")
	}
	return build(opt)
}

// build is New without the database: a simulation gives the Relay its own
// store and stream (seams.go).
func build(opt Options) (*Relay, error) {
	if opt.Config == nil || opt.NewPublisher == nil {
		return nil, errors.New("relay: Config and NewPublisher are required")
	}
	if opt.Metrics == nil {
		opt.Metrics = metrics.New()
	}
	if opt.StandbyRetry == 0 {
		opt.StandbyRetry = 2 * time.Second
	}
	if opt.SyncCheckInterval == 0 {
		opt.SyncCheckInterval = defaultSyncCheckInterval
	}
	if opt.SyncStallLimit == 0 {
		opt.SyncStallLimit = 3 * time.Second
	}
	if opt.SyncHoldOff == 0 {
		opt.SyncHoldOff = 30 * time.Second
	}
	if opt.NackPoisonAfter == 0 {
		opt.NackPoisonAfter = 5 * time.Minute
	}
	key, err := config.ParseRoutingKey(opt.Config.RoutingKey)
	if err != nil {
		return nil, fmt.Errorf("RELAY_ROUTING_KEY: %w", err)
	}
	schema, table, err := config.SplitTable(opt.Config.Table)
	if err != nil {
		return nil, fmt.Errorf("RELAY_TABLE: %w", err)
	}
	cols, err := opt.Config.Columns()
	if err != nil {
		return nil, err
	}
	r := &Relay{
		opt: opt, cfg: opt.Config, log: opt.Log, m: opt.Metrics, key: key,
		schema: schema, table: table, tableIdent: pgx.Identifier{schema, table}.Sanitize(),
		cols: cols, layout: decoder.NewLayout(cols), idCol: pgx.Identifier{cols.ID}.Sanitize(),
	}
	r.db, r.connect = r, r.connectStream
	return r, nil
}

// carrySet is Relay.carried. Sessions run one after another and only
// one goroutine of each touches it: the session adds to it once its
// pipeline has stopped (session.carry), the next one's publisher takes
// from it.
type carrySet struct{ ids map[string]struct{} }

// add remembers id, unless limit ids are held already: a set that large
// means the next session is not draining it, and what is not held is
// only published again.
func (c *carrySet) add(id string, limit int) {
	if c.ids == nil {
		c.ids = make(map[string]struct{})
	}
	if len(c.ids) < limit {
		c.ids[id] = struct{}{}
	}
}

// take reports whether id was held, and forgets it.
func (c *carrySet) take(id string) bool {
	if len(c.ids) == 0 { // empty but after a failed session: no hashing per event
		return false
	}
	if _, ok := c.ids[id]; ok {
		delete(c.ids, id)
		return true
	}
	return false
}

// ErrMisconfigured marks failures that retrying cannot fix: the relay exits
// on them before it has ever streamed, and keeps retrying (with the error
// logged) once it has, since an operator may be mid-change.
var ErrMisconfigured = errors.New("misconfigured")

// errStandby means another relay streams from the slot.
var errStandby = errors.New("replication slot is in use by another process")

// Run streams until ctx ends, then drains what is in flight, sends the final
// acknowledgement and returns nil. It returns an error only for a
// misconfiguration found before the first session streamed.
func (r *Relay) Run(ctx context.Context) error {
	bo := r.newBackoff(r.cfg.BackoffMin, r.cfg.BackoffMax)
	standby := false
	for {
		err := r.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			continue
		}
		if errors.Is(err, errStandby) {
			if !standby {
				r.log.Info().Str("slot", r.cfg.Slot).Msg("another relay holds the slot; standing by")
			}
			standby = true
			r.m.Standby.Set(1)
			r.m.SetReady(false, "standby: another relay holds slot "+r.cfg.Slot)
			if !sleep(ctx, r.opt.StandbyRetry) {
				return nil
			}
			continue
		}
		if standby {
			standby = false
			r.m.Standby.Set(0)
		}
		if errors.Is(err, errStepAside) {
			r.m.Retries.WithLabelValues("postgres", "sync_standby_step_aside").Inc()
			r.m.SetReady(false, "stepped aside as synchronous standby: "+err.Error())
			r.log.Error().Err(err).Dur("retry_in", r.opt.SyncHoldOff).
				Msg("the relay is an unintended synchronous standby and could not keep up: disconnected so that commits do not wait for it. " +
					"Name the physical standbys in synchronous_standby_names instead of '*'")
			if !sleep(ctx, r.opt.SyncHoldOff) {
				return nil
			}
			continue
		}
		if errors.Is(err, ErrMisconfigured) && !r.streamed {
			return err
		}
		dep := r.dependency(err)
		r.m.Reconnects.WithLabelValues(dep).Inc()
		wait := bo.next()
		why := "reconnecting: " + dep + ": " + err.Error()
		ev := r.log.Error().Err(err).Str("dependency", dep).Dur("retry_in", wait)
		if hint := settingHint(err, r.cfg); hint != "" {
			why += " (" + hint + ")"
			ev = ev.Str("fix", hint)
		}
		r.m.SetReady(false, why)
		ev.Msg("session failed; reconnecting")
		if !sleep(ctx, wait) {
			return nil
		}
		if r.progressed {
			// A session that made progress: the next failure is a new one.
			// One that did not (the broker or the database failed it at
			// once, or it ended on nacks) waits longer each time, so that
			// a dependency that stays down is not hammered with
			// connections and queries every BackoffMin.
			bo.reset()
		}
	}
}

// dependency names which side failed, for logs and metrics.
func (r *Relay) dependency(err error) string {
	// Every broker error is a depError where the pipeline meets the sink,
	// whichever sink it is; every database error one from classifyPg.
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, errBroker):
		return r.broker()
	case errors.As(err, &pgErr), errors.Is(err, errDatabase):
		return "postgres"
	}
	return "relay"
}

// depError is a failure of one of the relay's two dependencies. It reads
// "broker: …" or "database: …", and errors.Is matches it with errBroker or
// errDatabase.
type depError struct {
	dep error // errBroker or errDatabase
	err error
}

func (e *depError) Error() string        { return e.dep.Error() + ": " + e.err.Error() }
func (e *depError) Unwrap() error        { return e.err }
func (e *depError) Is(target error) bool { return target == e.dep }

// brokerFailure marks err as the broker's.
func brokerFailure(err error) error { return &depError{dep: errBroker, err: err} }

// databaseFailure marks err as the database's.
func databaseFailure(err error) error { return &depError{dep: errDatabase, err: err} }

var (
	errBroker   = errors.New("broker")
	errDatabase = errors.New("database")
)

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// backoff is capped exponential backoff with equal jitter: each wait is
// between half and all of its step.
type backoff struct {
	min, max, cur time.Duration
	rnd           func(n int64) int64 // [0, n)
}

// newBackoff draws its jitter from the Relay's source (r.rand): a
// simulation's is seeded.
func (r *Relay) newBackoff(min, max time.Duration) *backoff {
	rnd := r.rand
	if rnd == nil {
		rnd = rand.Int64N
	}
	return &backoff{min: min, max: max, rnd: rnd}
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur *= 2
		if b.cur > b.max {
			b.cur = b.max
		}
	}
	// Jitter between half and all of the step, so relays restarted together
	// do not reconnect in lockstep.
	half := b.cur / 2
	return half + time.Duration(b.rnd(int64(half)+1))
}

func (b *backoff) reset() { b.cur = 0 }

// broker names the sink in logs and metric labels: rabbitmq or nats.
func (r *Relay) broker() string {
	if r.cfg.Sink == "" {
		return config.SinkRabbitMQ
	}
	return r.cfg.Sink
}
