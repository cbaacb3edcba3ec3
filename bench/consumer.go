package main

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// base is the bench's monotonic clock origin: commit and receipt times are
// nanoseconds since base, taken in the same process.
var base = time.Now()

func nowNs() int64 { return int64(time.Since(base)) + 1 } // never 0: 0 means "not yet"

// Every event's id encodes the run, the phase and a sequence number, so the
// consumer can attribute each message_id without a lookup:
//
//	tttttttt-pppp-4000-8000-ssssssssssss   (run tag, phase, sequence; hex)
func eventID(tag uint32, phase int, seq int64) string {
	return fmt.Sprintf("%08x-%04x-4000-8000-%012x", tag, phase, seq)
}

func parseEventID(id string) (tag uint32, phase int, seq int64, ok bool) {
	if len(id) != 36 || id[8] != '-' || id[13] != '-' || id[18] != '-' || id[23] != '-' {
		return 0, 0, 0, false
	}
	t, err1 := strconv.ParseUint(id[0:8], 16, 32)
	p, err2 := strconv.ParseUint(id[9:13], 16, 16)
	s, err3 := strconv.ParseUint(id[24:36], 16, 48)
	if err1 != nil || err2 != nil || err3 != nil {
		return 0, 0, 0, false
	}
	return uint32(t), int(p), int64(s), true
}

// tracker accounts for one phase's events: which sequence numbers were
// committed (or published) and when, which were received and when, and the
// duplicates and reorderings seen.
type tracker struct {
	name    string
	streams int // sequence numbers seq%streams form one ordered stream
	commit  []int64
	recv    []int64

	distinct   atomic.Int64
	dups       atomic.Int64
	outOfRange atomic.Int64
	reorders   atomic.Int64
	firstNs    atomic.Int64
	lastSeq    []int64 // per stream; touched only by the one consumer goroutine of the queue
}

func newTracker(name string, n int, streams int) *tracker {
	if streams < 1 {
		streams = 1
	}
	t := &tracker{name: name, streams: streams, commit: make([]int64, n), recv: make([]int64, n), lastSeq: make([]int64, streams)}
	for i := range t.lastSeq {
		t.lastSeq[i] = -1
	}
	return t
}

func (t *tracker) received(seq int64, at int64) {
	if seq < 0 || seq >= int64(len(t.recv)) {
		t.outOfRange.Add(1)
		return
	}
	if !atomic.CompareAndSwapInt64(&t.recv[seq], 0, at) {
		t.dups.Add(1)
		return
	}
	t.firstNs.CompareAndSwap(0, at)
	t.distinct.Add(1)
	s := int(seq % int64(t.streams))
	if seq < t.lastSeq[s] {
		t.reorders.Add(1)
	} else {
		t.lastSeq[s] = seq
	}
}

// missing lists sequence numbers in [0, n) not received (at most max).
func (t *tracker) missing(n int, max int) (count int, first []int64) {
	for i := 0; i < n && i < len(t.recv); i++ {
		if atomic.LoadInt64(&t.recv[i]) == 0 {
			count++
			if len(first) < max {
				first = append(first, int64(i))
			}
		}
	}
	return count, first
}

// latencies returns commit→receipt latencies in nanoseconds, sorted, for
// every committed event, and how many arrived before the producer saw its
// COMMIT return (clamped to 0).
func (t *tracker) latencies() (lat []int64, early int, lost int) {
	for i := range t.commit {
		c := atomic.LoadInt64(&t.commit[i])
		if c == 0 {
			continue
		}
		r := atomic.LoadInt64(&t.recv[i])
		if r == 0 {
			lost++
			continue
		}
		d := r - c
		if d < 0 {
			early++
			d = 0
		}
		lat = append(lat, d)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat, early, lost
}

// consumer reads the bench's queues and feeds the trackers.
type consumer struct {
	tag      uint32
	conn     *amqp.Connection
	trackers [1 << 16]atomic.Pointer[tracker]
	stray    atomic.Int64 // messages whose id is not this run's
	errs     chan error
}

func newConsumer(url string, tag uint32) (*consumer, error) {
	conn, err := amqp.DialConfig(url, amqp.Config{Properties: amqp.Table{"connection_name": "outbox-relay-bench consumer"}})
	if err != nil {
		return nil, fmt.Errorf("consumer: connect to RabbitMQ: %w", err)
	}
	return &consumer{tag: tag, conn: conn, errs: make(chan error, 4)}, nil
}

func (c *consumer) register(phase int, t *tracker) { c.trackers[phase].Store(t) }

// consume starts one goroutine reading queue with automatic acks (the
// consumer must never be the bottleneck).
func (c *consumer) consume(queue string) error {
	ch, err := c.conn.Channel()
	if err != nil {
		return fmt.Errorf("consumer: open channel: %w", err)
	}
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consumer: consume %q: %w", queue, err)
	}
	go func() {
		for d := range deliveries {
			at := nowNs()
			tag, phase, seq, ok := parseEventID(d.MessageId)
			if !ok || tag != c.tag {
				c.stray.Add(1)
				continue
			}
			t := c.trackers[phase].Load()
			if t == nil {
				c.stray.Add(1)
				continue
			}
			t.received(seq, at)
		}
		select {
		case c.errs <- fmt.Errorf("consumer of %q stopped", queue):
		default:
		}
	}()
	return nil
}

func (c *consumer) close() { _ = c.conn.Close() }

// waitAll waits until t has received want distinct events, printing
// progress, and fails if nothing arrives for stall.
func (c *consumer) waitAll(ctx context.Context, t *tracker, want int64, stall time.Duration, progress func(got int64)) error {
	last := t.distinct.Load()
	lastChange := time.Now()
	nextProgress := time.Now().Add(2 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		got := t.distinct.Load()
		if got >= want {
			return nil
		}
		if got != last {
			last, lastChange = got, time.Now()
		}
		if time.Since(lastChange) > stall {
			return fmt.Errorf("%s: LOSS: received %d of %d distinct events; nothing new for %s", t.name, got, want, stall)
		}
		if progress != nil && time.Now().After(nextProgress) {
			progress(got)
			nextProgress = time.Now().Add(2 * time.Second)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-c.errs:
			return err
		case <-tick.C:
		}
	}
}
