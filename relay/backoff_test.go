package relay

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/sink"
)

// TestReconnectBackoffGrowsAfterStreaming: once the relay has streamed, a
// broker that stays down is dialled with a growing backoff, not every
// RELAY_BACKOFF_MIN: each failed session also claims the slot's lock and
// reads its state, so a fixed short retry would load the database too.
// (Before, the backoff was reset after every failure once any session had
// streamed: 50 ms, 50 ms, … here.)
func TestReconnectBackoffGrowsAfterStreaming(t *testing.T) {
	e := newEnv(t)
	var down atomic.Bool
	var dials atomic.Int64
	r := e.startWith(func(x *Relay) {
		dial := x.opt.NewPublisher
		x.opt.NewPublisher = func(ctx context.Context) (sink.Publisher, error) {
			if down.Load() {
				dials.Add(1)
				return nil, errors.New("test: the broker is down")
			}
			return dial(ctx)
		}
	}, func(p sink.Publisher) sink.Publisher { return &failing{Publisher: p, down: &down} })
	r.waitStreaming(t)
	first := newEvent("order", "created", `{}`)
	e.insertTx([]event{first}, true, nil)
	e.waitReceived(1, 20*time.Second)
	down.Store(true)
	e.insertTx([]event{newEvent("order", "paid", `{}`)}, true, nil) // its publish fails the session
	waitFor(t, 20*time.Second, "the first failed dial", func() bool { return dials.Load() > 0 })
	time.Sleep(4 * time.Second)
	// BackoffMin 50 ms, BackoffMax 1 s, jitter down to half a step: a growing
	// backoff dials about 8 times in 4 s, a reset one 80 to 160 times.
	if n := dials.Load(); n > 20 {
		t.Fatalf("%d dials in 4 s of a broker that stays down: the backoff does not grow", n)
	}
	down.Store(false)
	waitFor(t, 30*time.Second, "every row marked once the broker is back", func() bool { return e.unpublished() == 0 })
	r.stop(t)
}

// failing fails every publish while down is set.
type failing struct {
	sink.Publisher
	down *atomic.Bool
}

func (f *failing) Publish(ctx context.Context, m *sink.Message) (sink.Pending, error) {
	if f.down.Load() {
		return nil, errors.New("test: the broker is down")
	}
	return f.Publisher.Publish(ctx, m)
}
