package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// natsEnv is env with the relay publishing to NATS JetStream: its own
// streams and subject prefix on the shared server, and an ordered consumer
// that records what the events stream holds, in stream order.
type natsEnv struct {
	*env
	prefix string
	ncfg   sink.NATSConfig
	js     jetstream.JetStream

	nmu  sync.Mutex
	msgs []natsMsg
}

type natsMsg struct {
	subject string
	header  nats.Header
	data    []byte
}

func newNATSEnv(t *testing.T) *natsEnv {
	t.Helper()
	return newNATSEnvWith(t, ".{aggregate_type}.{event_type}")
}

// newNATSEnvWith is newNATSEnv with the routing key prefix+template.
func newNATSEnvWith(t *testing.T, template string) *natsEnv {
	t.Helper()
	e := newEnv(t) // its RabbitMQ side stays unused
	url := testenv.NATS(t)
	ne := &natsEnv{env: e, prefix: testenv.Name(t, "subj")}
	e.cfg.Sink = config.SinkNATS
	e.cfg.NATSURL = url
	e.cfg.RoutingKey = ne.prefix + template
	e.cfg.NATSStream = testenv.Name(t, "events")
	e.cfg.NATSDeadLetterStream = testenv.Name(t, "dead")
	e.cfg.NATSDeadLetterSubject = ne.prefix + "_dead_letter.events"
	e.cfg.NATSDuplicateWindow = 2 * time.Minute
	must(t, e.cfg.Validate())
	subjects, err := e.cfg.NATSStreamSubjects()
	must(t, err)
	ne.ncfg = sink.NATSConfig{
		URL: url, Stream: e.cfg.NATSStream, StreamSubjects: subjects,
		DeadLetterStream: e.cfg.NATSDeadLetterStream, DeadLetterSubject: e.cfg.NATSDeadLetterSubject,
		DuplicateWindow: e.cfg.NATSDuplicateWindow, MaxMessageBytes: e.cfg.MaxMessageBytes,
		MaxPending: 2*e.cfg.PublishWindow + 64, AckTimeout: 10 * time.Second,
	}

	ctx := context.Background()
	// Dial once so that the streams exist before the consumer.
	p, err := sink.DialNATS(ctx, ne.ncfg)
	must(t, err)
	p.Close()
	nc, err := nats.Connect(url)
	must(t, err)
	ne.js, err = jetstream.New(nc)
	must(t, err)
	cons, err := ne.js.OrderedConsumer(ctx, e.cfg.NATSStream, jetstream.OrderedConsumerConfig{})
	must(t, err)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		ne.nmu.Lock()
		ne.msgs = append(ne.msgs, natsMsg{subject: m.Subject(), header: m.Headers(), data: m.Data()})
		ne.nmu.Unlock()
	})
	must(t, err)
	t.Cleanup(func() {
		cc.Stop()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, s := range []string{e.cfg.NATSStream, e.cfg.NATSDeadLetterStream} {
			if err := ne.js.DeleteStream(ctx, s); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
				t.Errorf("delete stream %s: %v", s, err)
			}
		}
		nc.Close()
	})
	return ne
}

// start runs a relay publishing to NATS; wrap, if given, wraps its publisher.
func (ne *natsEnv) start(wrap func(sink.Publisher) sink.Publisher) *running {
	t := ne.t
	t.Helper()
	replCfg, err := replication.Config(ne.dbURL, "outbox-relay-test")
	must(t, err)
	m := metrics.New()
	log := zerolog.New(zerolog.NewTestWriter(t)).With().Timestamp().Logger().Level(zerolog.InfoLevel)
	cfg := *ne.cfg
	ncfg := ne.ncfg
	r, err := New(Options{
		Config: &cfg, Pool: ne.pool, Log: log, Metrics: m, Replication: replCfg,
		StandbyRetry: 200 * time.Millisecond,
		NewPublisher: func(ctx context.Context) (sink.Publisher, error) {
			p, err := sink.DialNATS(ctx, ncfg)
			if err != nil {
				return nil, err
			}
			if wrap == nil {
				return p, nil
			}
			return wrap(p), nil
		},
	})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	rr := &running{cancel: cancel, done: make(chan error, 1), metrics: m}
	go func() { rr.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-rr.done
		rr.done <- nil
	})
	return rr
}

func (ne *natsEnv) received() []natsMsg {
	ne.nmu.Lock()
	defer ne.nmu.Unlock()
	return append([]natsMsg(nil), ne.msgs...)
}

func (ne *natsEnv) waitNATS(n int, timeout time.Duration) {
	ne.t.Helper()
	waitFor(ne.t, timeout, fmt.Sprintf("%d NATS messages", n), func() bool { return len(ne.received()) >= n })
}

// streamMsgs is how many messages a stream holds.
func (ne *natsEnv) streamMsgs(stream string) int {
	ne.t.Helper()
	s, err := ne.js.Stream(context.Background(), stream)
	must(ne.t, err)
	info, err := s.Info(context.Background())
	must(ne.t, err)
	return int(info.State.Msgs)
}

// checkOrder asserts that the stream holds exactly want, in order, in the
// message format of the contract.
func (ne *natsEnv) checkOrder(want []event) {
	t := ne.t
	t.Helper()
	got := ne.received()
	if len(got) != len(want) {
		t.Fatalf("stream delivered %d messages, want exactly %d", len(got), len(want))
	}
	for i, m := range got {
		w := want[i]
		if id := m.header.Get(jetstream.MsgIDHeader); id != w.ID {
			t.Fatalf("message %d is %s, want %s: order broken", i, id, w.ID)
		}
		if wantSubj := ne.prefix + "." + w.AggregateType + "." + w.EventType; m.subject != wantSubj {
			t.Fatalf("%s: subject %q, want %q", w.ID, m.subject, wantSubj)
		}
		var a, b any
		must(t, json.Unmarshal([]byte(w.Payload), &a))
		if err := json.Unmarshal(m.data, &b); err != nil || fmt.Sprint(a) != fmt.Sprint(b) {
			t.Fatalf("%s: body %s, want %s", w.ID, m.data, w.Payload)
		}
		h := m.header
		occ, err := time.Parse(time.RFC3339Nano, h.Get("occurred_at"))
		if h.Get("type") != w.EventType || h.Get("Content-Type") != "application/json" ||
			h.Get("aggregate_type") != w.AggregateType || h.Get("aggregate_id") != w.AggregateID ||
			err != nil || time.Since(occ) > time.Hour {
			t.Fatalf("%s: headers %v", w.ID, h)
		}
	}
}

// TestNATSStreamsExactlyTheCommittedEventsInOrder: the NATS twin of
// TestStreamsExactlyTheCommittedEventsInOrder (invariants 1, 2, 3).
func TestNATSStreamsExactlyTheCommittedEventsInOrder(t *testing.T) {
	ne := newNATSEnv(t)
	r := ne.start(nil)
	r.waitStreaming(t)
	payloads := []string{`{"n":1}`, `null`, `[1,2,3]`, `"str"`, `{"unicode":"日本語 \u00e9"}`}
	extra := func(tx pgx.Tx) error {
		_, err := tx.Exec(context.Background(), `INSERT INTO other (v) VALUES ('x')`)
		return err
	}
	var want []event
	for i, n := range []int{1, 3, 17, 1, 120, 2, 1, 40} {
		var evs []event
		for j := 0; j < n; j++ {
			evs = append(evs, newEvent([]string{"order", "customer"}[j%2], []string{"created", "paid"}[i%2], payloads[(i+j)%len(payloads)]))
		}
		if i%3 == 2 {
			ne.insertTx([]event{newEvent("order", "cancelled", `{}`), newEvent("order", "cancelled", `{}`)}, false, extra)
		}
		ne.insertTx(evs, true, extra)
		want = append(want, evs...)
	}
	lastCommit := ne.currentLSN()
	ne.waitNATS(len(want), 30*time.Second)
	time.Sleep(300 * time.Millisecond) // anything extra would arrive now
	ne.checkOrder(want)
	waitFor(t, 10*time.Second, "all rows marked", func() bool { return ne.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot acknowledged past the last commit", func() bool { return ne.slotPast(lastCommit) })
	r.stop(t)
}

// TestNATSAckAfterDone (invariant 1): events stored in the stream but whose
// publish acks the relay has not seen do not move the slot or the marks.
func TestNATSAckAfterDone(t *testing.T) {
	ne := newNATSEnv(t)
	var g *gated
	r := ne.start(func(p sink.Publisher) sink.Publisher { g = newGated(p); return g })
	r.waitStreaming(t)
	// As TestAckAfterDone: an idle relay follows the server's WAL end, but
	// on a busy machine the walsender may take a while to get there (a
	// check after the transaction failed in CI: "slot not even at the
	// position before the transaction"), so wait for it before.
	before := ne.currentLSN()
	waitFor(t, 20*time.Second, "the idle slot to reach the WAL position before the transaction", func() bool { return ne.slotPast(before) })
	ne.insertTx([]event{newEvent("order", "created", `{}`), newEvent("order", "paid", `{}`)}, true, nil)
	after := ne.currentLSN()
	ne.waitNATS(2, 10*time.Second) // stored, ack not yet seen by the relay
	time.Sleep(time.Second)
	if ne.slotPast(after) {
		t.Fatal("slot acknowledged past a transaction whose publish acks were not seen")
	}
	if ne.unpublished() != 2 {
		t.Fatal("rows marked before their publish acks")
	}
	close(g.open)
	waitFor(t, 10*time.Second, "rows marked", func() bool { return ne.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot acknowledged after ack and mark", func() bool { return ne.slotPast(after) })
	r.stop(t)
}

// TestNATSRestartResumes: events committed while the relay is stopped
// arrive after it starts again, once each, in order (invariant 2).
func TestNATSRestartResumes(t *testing.T) {
	ne := newNATSEnv(t)
	r := ne.start(nil)
	r.waitStreaming(t)
	var all []event
	for i := 0; i < 10; i++ {
		all = append(all, newEvent("order", "created", `{}`))
	}
	ne.insertTx(all, true, nil)
	ne.waitNATS(10, 20*time.Second)
	waitFor(t, 10*time.Second, "first batch acknowledged", func() bool { return ne.slotPast(ne.currentLSN()) })
	r.stop(t)
	for i := 0; i < 4; i++ {
		var tx []event
		for j := 0; j < 5; j++ {
			tx = append(tx, newEvent("order", "paid", fmt.Sprintf(`{"tx":%d}`, i)))
		}
		ne.insertTx(tx, true, nil)
		all = append(all, tx...)
	}
	r = ne.start(nil)
	ne.waitNATS(len(all), 20*time.Second)
	time.Sleep(500 * time.Millisecond)
	ne.checkOrder(all)
	if n := ne.streamMsgs(ne.cfg.NATSStream); n != len(all) {
		t.Fatalf("stream holds %d messages, want %d", n, len(all))
	}
	waitFor(t, 10*time.Second, "all rows marked", func() bool { return ne.unpublished() == 0 })
	r.stop(t)
}

// TestNATSPoisonEventsAreDeadLettered (invariant 8): an event whose subject
// NATS cannot take (a space from the routing key template) and one over the
// size limit go to the dead-letter stream with the reason; their rows are
// marked and the events behind them flow on.
func TestNATSPoisonEventsAreDeadLettered(t *testing.T) {
	ne := newNATSEnv(t)
	ne.cfg.MaxMessageBytes = 4096
	ne.ncfg.MaxMessageBytes = 4096
	r := ne.start(nil)
	r.waitStreaming(t)
	spaced := newEvent("bad type", "created", `{}`)
	tooBig := newEvent("order", "created", `{"pad":"`+strings.Repeat("x", 5000)+`"}`)
	fine := newEvent("order", "created", `{"ok":true}`)
	ne.insertTx([]event{spaced, tooBig, fine}, true, nil)
	ne.waitNATS(1, 20*time.Second)
	waitFor(t, 10*time.Second, "rows marked", func() bool { return ne.unpublished() == 0 })
	ne.checkOrder([]event{fine})

	s, err := ne.js.Stream(context.Background(), ne.cfg.NATSDeadLetterStream)
	must(t, err)
	reasons := map[string]string{}
	for seq := uint64(1); seq <= 2; seq++ {
		m, err := s.GetMsg(context.Background(), seq)
		if err != nil {
			t.Fatalf("dead-letter stream message %d: %v", seq, err)
		}
		reasons[m.Header.Get(jetstream.MsgIDHeader)] = m.Header.Get("Outbox-Reason")
	}
	if r := reasons[spaced.ID]; !strings.Contains(r, "white space") {
		t.Fatalf("reason for the subject with a space: %q", r)
	}
	if r := reasons[tooBig.ID]; !strings.Contains(r, "RELAY_MAX_MESSAGE_BYTES") {
		t.Fatalf("reason for the oversized payload: %q", r)
	}
	if n := ne.streamMsgs(ne.cfg.NATSDeadLetterStream); n != 2 {
		t.Fatalf("dead-letter stream holds %d messages, want 2", n)
	}
	r.stop(t)
}

// TestNATSPoisonTextFieldsAreDeadLettered: TestPoisonTextFieldsAreDeadLettered
// for NATS (invariant 8): subjects NATS cannot take, header values it
// cannot carry as they are and headers over its limit are dead-lettered
// with the reason, every row is marked and the stream moves on.
func TestNATSPoisonTextFieldsAreDeadLettered(t *testing.T) {
	// With event_type out of the subject, only the header limits apply.
	for _, template := range []string{".{aggregate_type}.{event_type}", ".{aggregate_type}"} {
		t.Run(template, func(t *testing.T) { natsPoisonTextFields(t, template) })
	}
}

func natsPoisonTextFields(t *testing.T, template string) {
	ne := newNATSEnvWith(t, template)
	r := ne.start(nil)
	r.waitStreaming(t)
	evs := textFieldEvents()
	ne.insertRaw(evs)
	last := newEvent("order", "created", `{"last":true}`)
	ne.insertTx([]event{last}, true, nil)
	waitFor(t, 60*time.Second, "the event after the poison rows", func() bool {
		got := ne.received()
		return len(got) > 0 && got[len(got)-1].header.Get(jetstream.MsgIDHeader) == last.ID
	})
	waitFor(t, 10*time.Second, "rows marked", func() bool { return ne.unpublished() == 0 })
	got := map[string]string{}
	for _, m := range ne.received() {
		id := m.header.Get(jetstream.MsgIDHeader)
		got[id] = "delivered"
		ev := find(evs, last, id)
		subject := strings.NewReplacer("{aggregate_type}", ev.AggregateType, "{event_type}", ev.EventType).Replace(ne.prefix + template)
		if m.header.Get("type") != ev.EventType || m.header.Get("aggregate_type") != ev.AggregateType || m.subject != subject {
			t.Fatalf("%s delivered with other values than its row's (type %.20q, want %.20q)", id, m.header.Get("type"), ev.EventType)
		}
	}
	s, err := ne.js.Stream(context.Background(), ne.cfg.NATSDeadLetterStream)
	must(t, err)
	for seq, n := uint64(1), ne.streamMsgs(ne.cfg.NATSDeadLetterStream); seq <= uint64(n); seq++ {
		m, err := s.GetMsg(context.Background(), seq)
		must(t, err)
		id := m.Header.Get(jetstream.MsgIDHeader)
		if got[id] != "" {
			t.Fatalf("%s both delivered and dead-lettered", id)
		}
		reason := m.Header.Get("Outbox-Reason")
		if !strings.HasPrefix(reason, "rejected: ") {
			t.Fatalf("%s dead-lettered with reason %q", id, reason)
		}
		got[id] = reason
	}
	for _, ev := range evs {
		if got[ev.ID] == "" {
			t.Fatalf("row %s (event_type %d bytes %.20q, aggregate_type %d bytes %.20q) neither delivered nor dead-lettered",
				ev.ID, len(ev.EventType), ev.EventType, len(ev.AggregateType), ev.AggregateType)
		}
	}
	r.stop(t)
}

// dupCounting counts the publish acks that JetStream flagged as duplicates.
type dupCounting struct {
	sink.Publisher
	dups *atomic.Int64
}

func (d dupCounting) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	p, err := d.Publisher.Publish(ctx, m)
	if err != nil {
		return nil, err
	}
	return dupPending{p, d.dups}, nil
}

type dupPending struct {
	sink.Pending
	dups *atomic.Int64
}

func (p dupPending) Wait(ctx context.Context) (sink.Result, error) {
	res, err := p.Pending.Wait(ctx)
	if err == nil && res.Duplicate {
		p.dups.Add(1)
	}
	return res, err
}

// TestNATSCrashReplayIsDeduplicated (invariant 4, for NATS): a relay dies
// after its events reached the stream but before it saw the acks, so it
// neither marked the rows nor acknowledged the slot. The next relay replays
// and republishes them all; JetStream acks each as a duplicate and stores
// nothing, so consumers see every event once: no duplicate window.
func TestNATSCrashReplayIsDeduplicated(t *testing.T) {
	ne := newNATSEnv(t)
	ne.cfg.ShutdownTimeout = 200 * time.Millisecond // abandon the held acks at once
	r := ne.start(func(p sink.Publisher) sink.Publisher { return newGated(p) })
	r.waitStreaming(t)
	var evs []event
	for i := 0; i < 50; i++ {
		evs = append(evs, newEvent("order", "created", fmt.Sprintf(`{"i":%d}`, i)))
	}
	ne.insertTx(evs[:20], true, nil)
	ne.insertTx(evs[20:], true, nil)
	last := ne.currentLSN()
	ne.waitNATS(len(evs), 20*time.Second)
	r.cancel() // the crash: the gate never opens
	<-r.done
	r.done <- nil
	if ne.unpublished() != len(evs) || ne.slotPast(last) {
		t.Fatal("the crashed relay marked rows or acknowledged the slot without seeing acks")
	}

	ne.cfg.ShutdownTimeout = 20 * time.Second
	var dups atomic.Int64
	r = ne.start(func(p sink.Publisher) sink.Publisher { return dupCounting{p, &dups} })
	waitFor(t, 20*time.Second, "every row marked", func() bool { return ne.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot past the replay", func() bool { return ne.slotPast(last) })
	time.Sleep(300 * time.Millisecond)
	if n := dups.Load(); n != int64(len(evs)) {
		t.Fatalf("%d publish acks flagged duplicate on replay, want %d", n, len(evs))
	}
	if n := ne.streamMsgs(ne.cfg.NATSStream); n != len(evs) {
		t.Fatalf("stream holds %d messages after the replay, want %d", n, len(evs))
	}
	ne.checkOrder(evs)
	r.stop(t)
}

// dropping closes the NATS connection under the relay after n publishes.
type dropping struct {
	*sink.NATS
	n *atomic.Int64
}

func (d dropping) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	if d.n.Add(-1) == 0 {
		d.NATS.Close()
	}
	return d.NATS.Publish(ctx, m)
}

// TestNATSConnectionLossLosesNothing (invariant 2): the connection drops
// mid-stream with publishes in flight; the relay reconnects, republishes
// what was not acked, and the stream ends up with every event once, in
// order (the republished ones deduplicated).
func TestNATSConnectionLossLosesNothing(t *testing.T) {
	ne := newNATSEnv(t)
	var sessions atomic.Int64
	var left atomic.Int64
	left.Store(30)
	r := ne.start(func(p sink.Publisher) sink.Publisher {
		if sessions.Add(1) == 1 {
			return dropping{p.(*sink.NATS), &left}
		}
		return p
	})
	r.waitStreaming(t)
	var evs []event
	for i := 0; i < 8; i++ {
		var tx []event
		for j := 0; j < 25; j++ {
			tx = append(tx, newEvent("order", "created", fmt.Sprintf(`{"tx":%d,"i":%d}`, i, j)))
		}
		ne.insertTx(tx, true, nil)
		evs = append(evs, tx...)
	}
	last := ne.currentLSN()
	waitFor(t, 30*time.Second, "every row marked", func() bool { return ne.unpublished() == 0 })
	waitFor(t, 10*time.Second, "slot past the last commit", func() bool { return ne.slotPast(last) })
	if sessions.Load() < 2 {
		t.Fatal("the relay did not reconnect after the connection dropped")
	}
	ne.waitNATS(len(evs), 10*time.Second)
	time.Sleep(300 * time.Millisecond)
	ne.checkOrder(evs)
	r.stop(t)
}
