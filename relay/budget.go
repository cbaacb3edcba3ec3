package relay

import (
	"sync"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// budget bounds the event bytes in flight (RELAY_MAX_INFLIGHT_BYTES), so
// that memory is bounded in bytes, not only in events (invariant 9): the
// channels between the stages each hold up to RELAY_PUBLISH_WINDOW events,
// which with 1 MB payloads would be gigabytes.
//
// The reader acquires an event's bytes before it enters the pipeline, the
// confirmer releases them once the broker's verdict is in. One session, one
// budget: what a failed session held is forgotten with it.
type budget struct {
	mu    sync.Mutex
	limit int64
	used  int64
	room  chan struct{} // closed at the next release; nil while nobody waits
}

func newBudget(limit int64) *budget { return &budget{limit: limit} }

// acquire takes n bytes if they fit. An event larger than the limit fits
// when nothing else is in flight: it passes alone rather than never. When
// the bytes do not fit, acquire returns a channel that is closed at the
// next release, after which the caller tries again.
func (b *budget) acquire(n int64) (ok bool, room <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used == 0 || b.used+n <= b.limit {
		b.used += n
		return true, nil
	}
	if b.room == nil {
		b.room = make(chan struct{})
	}
	return false, b.room
}

// release returns n bytes acquired before.
func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	if b.room != nil {
		close(b.room)
		b.room = nil
	}
	b.mu.Unlock()
}

// inUse returns the bytes acquired and not yet released.
func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// eventBytes is what an event holds in memory: its payload and its text
// fields. Not the payload alone: a 100 kB aggregate_type is a valid message
// (a header under frame_max) when the routing key leaves it out, and 1,000
// of them held 100 MiB against a bound of 8 MiB.
func eventBytes(ev *decoder.Event) int64 {
	n := len(ev.Payload) + len(ev.ID) + len(ev.AggregateType) + len(ev.AggregateID) +
		len(ev.EventType) + len(ev.Invalid) + len(ev.Traceparent) + len(ev.Tracestate)
	for _, h := range ev.Headers {
		n += len(h.Value)
	}
	return int64(n)
}
