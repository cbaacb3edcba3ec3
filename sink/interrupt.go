package sink

import (
	"context"
	"sync"
	"sync/atomic"
)

// interrupter runs cut when the context of a call in progress ends: cut
// makes a write blocked in the socket fail (a past write deadline), since
// neither amqp091 nor nats.go looks at a context once it writes, and a
// broker that stops reading (RabbitMQ's resource alarms) would otherwise
// hold the call, and a stopping relay, until it reads again.
//
// The relay passes the same session context to every call, so that
// context is watched once for the connection's life and each call only
// counts itself in and out: a per-call context.AfterFunc measured about
// 0.6 µs and two allocations, on the path of every event. Calls under any
// other context get their own watch. A context that ends while no call is
// in progress cuts nothing, so a normal stop still closes gracefully.
type interrupter struct {
	cut func()
	end func() // counts a call under the watched context out

	mu      sync.Mutex
	watched <-chan struct{} // Done of the watched context
	calls   atomic.Int64    // calls in progress under it
}

func newInterrupter(cut func()) *interrupter {
	in := &interrupter{cut: cut}
	in.end = func() { in.calls.Add(-1) }
	return in
}

func nothing() {}

// during marks a call under ctx as in progress until the returned end is
// called; if ctx ends meanwhile, cut runs.
func (in *interrupter) during(ctx context.Context) (end func()) {
	done := ctx.Done()
	if done == nil {
		return nothing // never ends
	}
	in.mu.Lock()
	if in.watched == nil {
		in.watched = done
		context.AfterFunc(ctx, func() {
			if in.calls.Load() > 0 {
				in.cut()
			}
		})
	}
	same := in.watched == done
	in.mu.Unlock()
	if !same {
		return in.once(ctx)
	}
	in.calls.Add(1)
	// Either the watch sees this call counted, or this sees ctx ended.
	if ctx.Err() != nil {
		in.cut()
	}
	return in.end
}

// once is during for a call whose context is its own (a timeout around
// one call), which must not become the watched one.
func (in *interrupter) once(ctx context.Context) (end func()) {
	stop := context.AfterFunc(ctx, in.cut)
	return func() { stop() }
}
