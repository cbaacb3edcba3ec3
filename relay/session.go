package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/sink"
)

// item is one event on its way through the pipeline.
type item struct {
	tx      *checkpoint.Tx
	xid     uint32    // 0 for swept rows
	pos     streamPos // its place in the stream; zero for swept rows
	sweep   bool
	ev      decoder.Event
	msg     sink.Message
	pending sink.Pending // while fate is fatePublish and the verdict is awaited
	span    trace.Span   // the relay's span, from publish to verdict (Options.Tracer)
	sentAt  time.Time
	fate    fate
	dead    deadReason // with fateDeadLetter
	bytes   int64      // event bytes acquired from the session's budget
}

// streamPos is an event's place in the stream: its transaction's commit
// LSN and its number within the transaction, from 1.
type streamPos struct {
	lsn   pglogrepl.LSN
	event int32
}

func (p streamPos) after(q streamPos) bool {
	return p.lsn > q.lsn || (p.lsn == q.lsn && p.event > q.event)
}

// fate is what the pipeline does with an item. The publisher decides it
// (the replay filter may set fateSkip before); the confirmer may turn a
// published event into a dead-lettered or dropped one. Every fate but
// fateSkip ends with the row marked.
type fate uint8

const (
	fatePublish    fate = iota // publish and await the broker's verdict
	fateSkip                   // already published: neither publish nor mark
	fateCarried                // confirmed in an earlier session: mark, do not publish
	fateDeadLetter             // sent to the dead-letter destination instead (dead says why)
	fateDropped                // unroutable under RELAY_UNROUTABLE=drop: marked, not delivered
)

// deadReason is why an event is dead-lettered: class is the label of
// outbox_relay_events_dead_lettered_total, text the x-outbox-reason header
// (Outbox-Reason on NATS).
type deadReason struct{ class, text string }

// The dead-letter classes.
const (
	deadInvalidRow = "invalid row" // the decoder's rules: a NULL, an unreadable occurred_at
	deadRejected   = "rejected"    // the broker could never accept it (sink.Publisher.Reject)
	deadUnroutable = "unroutable"  // no queue bound, RELAY_UNROUTABLE=dead-letter
	deadNacked     = "nacked"      // nacked maxNacks times for what it is (sink.Result.Permanent)
)

func newDeadReason(class, detail string) deadReason {
	return deadReason{class: class, text: class + ": " + detail}
}

// session is one connected run of the pipeline.
type session struct {
	r   *Relay
	log zerolog.Logger
	// deletedLogged and deletedSinceLog rate-limit the marker's warning
	// about rows deleted before their mark (noteDeleted).
	deletedLogged   time.Time
	deletedSinceLog int
	conn            stream
	pub             sink.Publisher
	tracker         *checkpoint.Tracker

	items     chan *item
	pending   chan *item
	confirmed chan *item
	drained   chan struct{}
	inflight  *budget // event bytes between the reader and the confirmer

	streaming bool     // START_REPLICATION succeeded; only the reader touches it
	filtering bool     // replayed rows may already be marked; see filterPublished
	retry     *backoff // shared by the confirmer's republishes
	unmarked  []*item  // the marker's batch when a mark failed or was cut short
	serverEnd pglogrepl.LSN
	lastHeard time.Time // last message from the server

	// unforwarded is the confirmer's item when its hand-over to the marker
	// was cut short. Marker and confirmer each write their own field;
	// session reads both after g.Wait.
	unforwarded *item
	// prompt: commits may wait for the relay (it is a synchronous standby
	// candidate, or RELAY_SYNC_PUBLISH): the reader answers as soon as the
	// done position moves, not on the status interval (promptStatus).
	prompt  atomic.Bool
	syncMu  sync.Mutex    // serializes applySync
	started chan struct{} // closed once streaming
	// halted: a stage failed on the database's side (the marker, the
	// replay filter) or the ownership lock's connection ended while
	// streaming. The broker may be fine, so the pipeline is not cancelled:
	// the reader stops reading, and what was published is confirmed and
	// carried to the next session instead of being published again (halt).
	// The reader still bounds the wait (5 s), as for a failed stream.
	halted   chan struct{}
	haltOne  sync.Once
	haltErr  error         // set before halted is closed
	progress chan struct{} // the marker finished events (capacity 1)
	// barrierPos: the synchronous standbys have every commit before it
	// (standby.go); noSyncUntil: synchronous_standby_names was empty, and
	// is trusted to be until then. Only the publisher touches them.
	barrier     barrier // nil without RELAY_WAIT_FOR_SYNC_STANDBY
	barrierPos  pglogrepl.LSN
	lastTxLSN   pglogrepl.LSN // the last streamed item's transaction
	noSyncUntil time.Time
	stopping    <-chan struct{} // SIGTERM: the run's soft end
	sentPos     pglogrepl.LSN   // the reader's last status: position and time
	sentAt      time.Time

	// The step-aside guard (syncstate.go, checkStall): while the relay is
	// an unintended synchronous standby and another candidate exists.
	mayStepAside atomic.Bool
	finished     atomic.Uint64 // events the marker finished
	stallSeen    uint64        // finished, at the reader's last check
	stuckSince   time.Time

	// The marker's records (mark.go, markOrRecord): how many of this slot's
	// confirmed events wait in outbox_relay_confirmed for their mark.
	records      int
	completeWait time.Duration
	lastComplete time.Time
}

// promptGap is the least time between two prompt status updates: a busy
// cluster sends hundreds of keepalives a second, and each one a
// synchronous standby answers costs a write on both sides. A commit waits
// at most this much longer for it.
const promptGap = time.Millisecond

// session is one connected run, in four steps: claim the slot and settle
// its state (slotState), connect to both sides, open the stream (a new slot
// comes with its table sweep), and run the pipeline until it ends.
func (r *Relay) session(ctx context.Context) error {
	r.progressed = false
	// Before the slot is even looked at: only its owner may drop, create,
	// sweep or stream it.
	own, err := r.db.claim(ctx)
	if err != nil {
		return err
	}
	defer own.release()
	si, err := r.slotState(ctx)
	if err != nil {
		return err
	}

	pub, err := r.opt.NewPublisher(ctx)
	if err != nil {
		return brokerFailure(err)
	}
	defer pub.Close()
	conn, err := r.connect(ctx)
	if err != nil {
		return classifyPg(err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	if _, err := conn.IdentifySystem(ctx); err != nil {
		return classifyPg(err)
	}
	// The barrier's connection, opened now, finds the server the stream
	// just found (standby.go); it is never opened again in this session.
	var b barrier
	if r.cfg.WaitForSyncStandby {
		if b, err = r.db.openBarrier(ctx); err != nil {
			return err
		}
		defer b.close()
	}

	start, sweep := si.confirmed, sweepCursor(nil)
	if !si.exists {
		if start, sweep, err = r.createSlot(ctx, conn); err != nil {
			return err
		}
		defer sweep.close() // read-only; ended after the sweep
	}
	s := r.newSession(conn, pub, start)
	s.barrier = b
	began := time.Now()
	err = s.run(ctx, own, sweep)
	r.progressed = (s.finished.Load() > 0 || time.Since(began) >= time.Minute) && !errors.Is(err, errNackedInARow)
	s.carryConfirmed()
	s.endAbandonedSpans(err)
	return err
}

// slotState reads the slot's state and settles it: a slot that is lost,
// or whose table sweep never finished, is dropped, to be created again.
// errStandby: another relay streams from it.
func (r *Relay) slotState(ctx context.Context) (slotInfo, error) {
	qctx, qcancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	si, err := r.db.preflight(qctx)
	qcancel()
	if err != nil {
		return si, err
	}
	if si.exists && si.active {
		return si, errStandby
	}
	if si.exists && si.walStatus == "lost" {
		r.log.Error().Str("slot", r.cfg.Slot).
			Msg("replication slot is LOST (its WAL was removed, e.g. by max_slot_wal_keep_size): " +
				"dropping and recreating it; unpublished rows will be recovered from the table")
		if err := r.db.dropSlot(ctx); err != nil {
			return si, err
		}
		return slotInfo{}, nil
	}
	if si.exists {
		pending, err := r.db.sweepPending(ctx)
		if err != nil {
			return si, err
		}
		if pending {
			r.log.Warn().Str("slot", r.cfg.Slot).
				Msg("the table sweep after this slot's creation never finished: recreating the slot to sweep again")
			if err := r.db.dropSlot(ctx); err != nil {
				return si, err
			}
			return slotInfo{}, nil
		}
	}
	return si, nil
}

// createSlot creates the slot and opens the table sweep on its snapshot:
// the rows already in the table that the slot will never deliver. The
// sweep is marked pending first, so that a relay that dies before it
// finished sweeps again on a new slot.
func (r *Relay) createSlot(ctx context.Context, conn stream) (pglogrepl.LSN, sweepCursor, error) {
	if err := r.db.setSweepPending(ctx, true); err != nil {
		return 0, nil, err
	}
	watched := r.db.watchSlotCreation(ctx, conn.PID())
	created, err := conn.CreateSlot(ctx, r.cfg.Slot)
	watched()
	switch {
	case replication.HasCode(err, replication.CodeDuplicateObject):
		return 0, nil, errStandby // another relay created it just now
	case err != nil:
		return 0, nil, classifyPg(err)
	}
	r.log.Warn().Str("slot", r.cfg.Slot).Str("consistent_point", created.ConsistentPoint.String()).
		Msg("created replication slot; publishing unpublished rows already in the table before streaming")
	// Import the slot's snapshot before the replication connection runs
	// its next command, which would invalidate it.
	sweep, err := r.db.beginSweep(ctx, created.Snapshot)
	if err != nil {
		return 0, nil, err
	}
	return created.ConsistentPoint, sweep, nil
}

func (r *Relay) newSession(conn stream, pub sink.Publisher, start pglogrepl.LSN) *session {
	s := &session{
		r: r, log: r.log, conn: conn, pub: pub,
		tracker:   checkpoint.New(start),
		items:     make(chan *item, r.cfg.PublishWindow),
		pending:   make(chan *item, r.cfg.PublishWindow),
		confirmed: make(chan *item, r.cfg.MarkBatchSize*2),
		drained:   make(chan struct{}),
		inflight:  newBudget(int64(r.cfg.MaxInflightBytes)),
		started:   make(chan struct{}),
		halted:    make(chan struct{}),
		progress:  make(chan struct{}, 1),
		filtering: true,
		retry:     r.newBackoff(r.cfg.BackoffMin, r.cfg.BackoffMax),
	}
	// Until this session's first check, assume what the last one found: a
	// reconnecting synchronous standby is one again at once.
	s.prompt.Store(r.cfg.SyncPublish || syncCandidate(r.syncLogged))
	r.m.AckedLSN.Set(float64(start))
	return s
}

// run is the pipeline: read -> publish -> confirm -> mark, each stage a
// goroutine, with the watchers beside them. It returns when all have.
func (s *session) run(ctx context.Context, own ownership, sweep sweepCursor) error {
	r := s.r
	// The pipeline runs on its own context: SIGTERM (ctx) only stops the
	// reader, the rest drains, unless the drain outlasts ShutdownTimeout.
	pctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(r.cfg.ShutdownTimeout, func() {
			r.log.Error().Dur("timeout", r.cfg.ShutdownTimeout).Msg("drain took too long; abandoning in-flight events (they will be replayed)")
			cancel()
		})
		context.AfterFunc(pctx, func() { t.Stop() })
	})
	defer stop()

	s.stopping = ctx.Done()
	g, gctx := errgroup.WithContext(pctx)
	g.Go(func() error { return s.publish(gctx) })
	g.Go(func() error { return s.confirm(gctx) })
	g.Go(func() error { return s.mark(gctx) })
	// Two ends for the stages that read or watch: ctx (SIGTERM) stops
	// reading and lets the rest drain; gctx, the pipeline's, drops it all.
	st := stops{soft: ctx, hard: gctx}
	g.Go(func() error { return s.read(st, sweep) })
	g.Go(func() error { return s.watchSync(st) })
	if r.cfg.HeartbeatInterval > 0 {
		g.Go(func() error { return s.heartbeat(st) })
	}
	g.Go(func() error { return s.watchOwner(gctx, own) })
	return g.Wait()
}

// stops are a stage's two ends. soft ends on a graceful stop (SIGTERM):
// read no more, let what was read drain. hard ends when the pipeline is
// cancelled (a failed stage, or a drain past RELAY_SHUTDOWN_TIMEOUT):
// drop everything.
type stops struct {
	soft context.Context
	hard context.Context
}

// errOwnerLost ends a session whose ownership lock may be gone.
var errOwnerLost = databaseFailure(errors.New("the connection holding the slot's ownership lock ended"))

// watchOwner halts the session when the ownership lock may be gone: the
// reader (or the table sweep) reads no more and the publisher publishes
// nothing more, at once, so that a standby that now takes the lock and
// sweeps a slot that is not streaming yet never races this session's
// publishing. What is in flight is given its moment to be confirmed and
// marked (or carried) rather than published again. Cancelling the pipeline
// during the sweep instead abandoned every event in flight: a connection
// cut during the sweep published up to 166 events twice
// (TestReplicationConnectionCut, about one run in five).
func (s *session) watchOwner(ctx context.Context, own ownership) error {
	select {
	case <-own.Lost():
	case <-ctx.Done():
		return nil
	case <-s.drained:
		return nil
	}
	s.halt(errOwnerLost)
	return nil
}

// halt ends the session without cancelling its pipeline (see halted). The
// first error wins; the reader returns it.
func (s *session) halt(err error) {
	s.haltOne.Do(func() {
		s.haltErr = err
		close(s.halted)
		if s.conn != nil {
			s.conn.Interrupt() // wake the receive; the reader then sees halted
		}
	})
}

// haltedWith returns the halt's error, or nil while the session runs.
func (s *session) haltedWith() error {
	select {
	case <-s.halted:
		return s.haltErr
	default:
		return nil
	}
}

// carryConfirmed hands the events the broker confirmed but nobody marked
// to the next session, which marks them instead of publishing them again:
// the marker's batch, the one the confirmer was handing over, and those
// between them. Call it after the pipeline's goroutines have returned.
func (s *session) carryConfirmed() {
	for _, it := range s.unmarked {
		s.carry(it)
	}
	if s.unforwarded != nil {
		s.carry(s.unforwarded)
	}
	// The confirmer closed the channel when it stopped, so this ends.
	for it := range s.confirmed {
		s.carry(it)
	}
}

// read owns the replication connection for the whole session. When it
// stops, for a signal or a failure, it lets the events already read finish.
func (s *session) read(st stops, sweep sweepCursor) (err error) {
	soft, hard := st.soft, st.hard
	defer func() {
		// Whatever happened, tell the server what is done: it shortens the
		// replay after a restart and never claims more than is done. Not
		// before START_REPLICATION: there is no stream to tell.
		if !s.streaming {
			return
		}
		if serr := s.sendStatus(false); serr != nil && err == nil && soft.Err() == nil {
			err = serr
		}
	}()
	err = s.stream(st, sweep)
	if err != nil && !errors.Is(err, errStopping) && !errors.Is(err, errStepAside) {
		s.halt(err) // the publisher publishes nothing more of what was read
	}
	close(s.items)
	switch {
	case errors.Is(err, errStopping):
		s.r.m.SetReady(false, "shutting down")
		if err = s.awaitDrain(hard); errors.Is(err, errStepAside) {
			s.stepAside()
		}
		return err
	case errors.Is(err, errStepAside):
		s.stepAside()
	case err != nil && hard.Err() == nil:
		// The stream failed but the broker may be fine: give the events in
		// flight a moment to be confirmed, so they are marked (or carried
		// to the next session) rather than published again.
		t := time.NewTimer(5 * time.Second)
		defer t.Stop()
		select {
		case <-s.drained:
		case <-t.C:
		case <-hard.Done():
		}
	}
	return err
}

// errStopping ends the stream for a graceful stop.
var errStopping = errors.New("stopping")

// stream starts replication and feeds the pipeline until it fails or soft
// ends.
func (s *session) stream(st stops, sweep sweepCursor) error {
	soft, hard := st.soft, st.hard
	if sweep != nil {
		if err := s.sweep(st, sweep); err != nil {
			return err
		}
	}
	if soft.Err() != nil {
		return errStopping
	}
	if err := s.conn.Start(hard, s.r.cfg.Slot, s.r.cfg.Publication, 0); err != nil {
		if replication.SlotInUse(err) {
			return errStandby
		}
		return classifyPg(err)
	}
	// A stop wakes the receive rather than waiting for the next message or
	// status interval (up to RELAY_STATUS_INTERVAL).
	defer context.AfterFunc(soft, s.conn.Wake)()
	s.streaming = true
	close(s.started)
	s.r.streamed = true
	s.r.m.Standby.Set(0)
	s.r.m.SetReady(true, "")
	s.log.Info().Str("slot", s.r.cfg.Slot).Str("from", s.tracker.Done().String()).Msg("streaming")

	dec := decoder.New(s.r.schema, s.r.table, s.r.layout)
	interval := s.r.cfg.StatusInterval
	var tx *checkpoint.Tx
	var xid uint32
	var pos streamPos
	var committed time.Time // of tx, until its first event is observed
	nextStatus := time.Now().Add(interval)
	s.lastHeard = time.Now()
	var stopping time.Time
	for {
		if soft.Err() != nil {
			// A graceful stop ends at a transaction's commit, so that its
			// acknowledgement covers what was published: a transaction cut
			// short is replayed whole, and the replay filter cannot tell a
			// published row deleted since from an unpublished one (found by
			// the simulator, seed 2163). Not for longer than half the
			// drain's time.
			if stopping.IsZero() {
				stopping = time.Now()
			}
			if tx == nil || time.Since(stopping) > s.r.cfg.ShutdownTimeout/2 {
				return errStopping
			}
		}
		if err := s.haltedWith(); err != nil {
			return err
		}
		if hard.Err() != nil {
			return hard.Err()
		}
		msg, err := s.conn.Receive(nextStatus)
		now := time.Now()
		if errors.Is(err, replication.ErrWoken) {
			// The marker finished events while commits may wait for us.
			if err := s.promptStatus(now, &nextStatus); err != nil {
				return err
			}
			continue
		}
		if errors.Is(err, replication.ErrTimeout) {
			// Silence: ask the server to answer, and give up on a server
			// (or network) that stopped answering without closing.
			silent := now.Sub(s.lastHeard)
			if silent > s.r.cfg.PostgresTimeout {
				return databaseFailure(fmt.Errorf("no message on the replication stream for %s (RELAY_POSTGRES_TIMEOUT)",
					silent.Round(time.Second)))
			}
			if err := s.statusNow(now, silent > interval, &nextStatus); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			if replication.SlotInUse(err) {
				return errStandby
			}
			return classifyPg(err)
		}
		s.lastHeard = now
		if msg.ServerWALEnd > s.serverEnd {
			s.serverEnd = msg.ServerWALEnd
		}
		if msg.Keepalive {
			s.tracker.Received(msg.ServerWALEnd)
			moved := s.tracker.AdvanceIdle(msg.ServerWALEnd)
			switch {
			case msg.ReplyRequested || !now.Before(nextStatus):
				if err := s.statusNow(now, false, &nextStatus); err != nil {
					return err
				}
			case moved && s.prompt.Load():
				// A synchronous standby's walsender sends keepalives
				// without asking for a reply and waits for the flush
				// report: commits anywhere in the cluster wait for it.
				if err := s.promptStatus(now, &nextStatus); err != nil {
					return err
				}
			}
			continue
		}
		s.tracker.Received(msg.WALStart)
		m, err := dec.Decode(msg.Data)
		if err != nil {
			return fmt.Errorf("decode pgoutput message at %s: %w", msg.WALStart, err)
		}
		switch m.Kind {
		case decoder.KindBegin:
			// Open it now, not at its first event: an open transaction keeps
			// AdvanceIdle from moving past it on a keepalive mid-transaction.
			// The tracker folds the empty ones away at Close.
			tx, xid, committed = s.tracker.Begin(), m.Begin.Xid, m.Begin.CommitTime
			pos = streamPos{lsn: m.Begin.FinalLSN}
		case decoder.KindEvent:
			// The decoder refuses an insert or commit outside a
			// transaction, so tx is set here.
			if !committed.IsZero() {
				// Only transactions with events: servers before 15 also
				// send the empty ones.
				s.r.m.StreamDelay.Observe(max(0, now.Sub(committed).Seconds()))
				committed = time.Time{}
			}
			s.tracker.Add(tx)
			pos.event++
			it := &item{tx: tx, xid: xid, pos: pos, ev: m.Event}
			if err := s.send(hard, it, &nextStatus); err != nil {
				return err
			}
		case decoder.KindCommit:
			s.tracker.Close(tx, m.Commit.EndLSN)
			tx = nil
			if s.prompt.Load() {
				// A transaction without events is done at once.
				if err := s.promptStatus(now, &nextStatus); err != nil {
					return err
				}
			}
		}
		if !now.Before(nextStatus) {
			if err := s.statusNow(now, false, &nextStatus); err != nil {
				return err
			}
		}
	}
}

// send hands an item to the publisher once its bytes fit in the
// in-flight budget (RELAY_MAX_INFLIGHT_BYTES). While it waits, for bytes or
// for room in the channel, it keeps the server informed, so a slow broker
// never trips wal_sender_timeout; nextStatus is nil before streaming starts
// (the table sweep), when there is no stream to keep alive.
func (s *session) send(ctx context.Context, it *item, nextStatus *time.Time) error {
	if err := s.haltedWith(); err != nil {
		return err
	}
	it.bytes = eventBytes(&it.ev)
	acquired, room := s.inflight.acquire(it.bytes)
	if acquired {
		select {
		case s.items <- it:
			return nil
		default:
		}
	}
	for {
		// Until the bytes are acquired the item must not enter the
		// pipeline; after, room is nil and only the channel is waited for.
		var out chan<- *item
		if acquired {
			out = s.items
		}
		var tick <-chan time.Time
		var progress <-chan struct{}
		var t *time.Timer
		if nextStatus != nil {
			wait := time.Until(*nextStatus)
			if wait <= 0 {
				if err := s.statusNow(time.Now(), false, nextStatus); err != nil {
					return err
				}
				continue
			}
			t = time.NewTimer(wait)
			tick = t.C
			progress = s.progress
		}
		select {
		case out <- it:
			stopTimer(t)
			return nil
		case <-room:
			acquired, room = s.inflight.acquire(it.bytes)
		case <-tick:
		case <-progress:
			stopTimer(t)
			if err := s.promptStatus(time.Now(), nextStatus); err != nil {
				return err
			}
		case <-s.halted:
			stopTimer(t)
			return s.haltErr
		case <-ctx.Done():
			stopTimer(t)
			return ctx.Err()
		}
		stopTimer(t)
	}
}

func stopTimer(t *time.Timer) {
	if t != nil {
		t.Stop()
	}
}

// notifyDone tells the reader that the done position may have moved, so
// that it acknowledges at once: the marker calls it while commits may wait
// for the relay. The reader is in Receive (Wake) or waiting for room in
// the pipeline (progress).
func (s *session) notifyDone() {
	if s.conn == nil { // a test of the marker alone
		return
	}
	select {
	case s.progress <- struct{}{}:
	default:
	}
	s.conn.Wake()
}

// promptStatus sends a status update now if the done position moved since
// the last one, or schedules it promptGap after the last one.
func (s *session) promptStatus(now time.Time, nextStatus *time.Time) error {
	if !s.prompt.Load() || s.tracker.Done() <= s.sentPos {
		return nil
	}
	if at := s.sentAt.Add(promptGap); now.Before(at) {
		if at.Before(*nextStatus) {
			*nextStatus = at
		}
		return nil
	}
	if err := s.sendStatus(false); err != nil {
		return err
	}
	*nextStatus = now.Add(s.r.cfg.StatusInterval)
	return nil
}

// stepAside leaves at once, without waiting for the pipeline (it may be
// stuck on the broker): while the walsender lives, commits wait for it.
func (s *session) stepAside() {
	_ = s.sendStatus(false)
	s.streaming = false // nothing more to tell the server
	cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = s.conn.Close(cctx)
	cancel()
}

// awaitDrain waits until everything read has been published and marked.
// Meanwhile it keeps telling the server what is done, on the interval and
// at once while commits may wait for the relay, and steps aside as an
// unintended synchronous standby that cannot finish: a drain behind a slow
// broker must not hold every commit of the cluster for
// RELAY_SHUTDOWN_TIMEOUT.
func (s *session) awaitDrain(ctx context.Context) error {
	var tick <-chan time.Time
	var progress <-chan struct{}
	next := time.Now().Add(s.r.cfg.StatusInterval)
	if s.streaming {
		t := time.NewTicker(s.r.cfg.StatusInterval)
		defer t.Stop()
		tick, progress = t.C, s.progress
	}
	for {
		select {
		case <-s.drained:
			s.log.Info().Str("acknowledged", s.tracker.Done().String()).Msg("drained in-flight events")
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-progress:
			if err := s.promptStatus(time.Now(), &next); err != nil {
				return err
			}
		case now := <-tick:
			if err := s.sendStatus(false); err != nil {
				return err
			}
			next = now.Add(s.r.cfg.StatusInterval)
			if err := s.checkStall(now); err != nil {
				return err
			}
		}
	}
}

// statusNow is the status update on the interval: it acknowledges the done
// position, schedules the next update and runs the step-aside guard.
func (s *session) statusNow(now time.Time, reply bool, next *time.Time) error {
	if err := s.sendStatus(reply); err != nil {
		return err
	}
	*next = now.Add(s.r.cfg.StatusInterval)
	return s.checkStall(now)
}

// sendStatus acknowledges the done position.
func (s *session) sendStatus(reply bool) error {
	pos := s.tracker.Done()
	if err := s.conn.SendStatus(pos, reply); err != nil {
		return classifyPg(err)
	}
	s.sentPos, s.sentAt = pos, time.Now()
	acked := s.tracker.Acknowledge(pos)
	m := s.r.m
	m.AckedLSN.Set(float64(acked))
	received, _, _ := s.tracker.Positions()
	m.ReceivedLSN.Set(float64(received))
	end := s.serverEnd
	if end < received {
		end = received
	}
	m.ServerWALEnd.Set(float64(end))
	if end > acked {
		m.ReplicationLag.Set(float64(end - acked))
	} else {
		m.ReplicationLag.Set(0)
	}
	return nil
}

// heartbeat writes a transactional logical message now and then, so that a
// server with no other traffic still moves the slot forward.
func (s *session) heartbeat(st stops) error {
	soft, hard := st.soft, st.hard
	t := time.NewTicker(s.r.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-soft.Done():
			return nil
		case <-hard.Done():
			return nil
		case <-t.C:
		}
		_, err := s.r.db.emitHeartbeat(hard)
		if err != nil && hard.Err() == nil {
			s.r.m.Retries.WithLabelValues("postgres", "heartbeat").Inc()
			s.log.Warn().Err(err).Msg("heartbeat (RELAY_HEARTBEAT_INTERVAL) failed")
		}
	}
}

// emitHeartbeat writes a transactional logical message and returns its
// position.
func (r *Relay) emitHeartbeat(ctx context.Context) (pglogrepl.LSN, error) {
	qctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	var lsn pglogrepl.LSN
	err := r.opt.Pool.QueryRow(qctx, `SELECT pg_logical_emit_message(true, 'outbox-relay-heartbeat', '')::text`).Scan(&lsn)
	return lsn, err
}

// carry remembers a confirmed, unmarked event for the next session.
func (s *session) carry(it *item) {
	if it.fate == fateSkip || it.ev.ID == "" {
		return
	}
	s.r.carried.add(strings.Clone(it.ev.ID), 4*s.r.cfg.PublishWindow+4*s.r.cfg.MarkBatchSize)
}
