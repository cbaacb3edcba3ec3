package sink

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

func TestInterrupterCutsOnlyACallInProgress(t *testing.T) {
	var cuts atomic.Int64
	in := newInterrupter(func() { cuts.Add(1) })
	waitCuts := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for cuts.Load() != want {
			if time.Now().After(deadline) {
				t.Fatalf("%d cuts, want %d", cuts.Load(), want)
			}
			time.Sleep(time.Millisecond)
		}
	}

	// The session context ends between calls: a graceful stop, no cut.
	session, stop := context.WithCancel(context.Background())
	in.during(session)()
	stop()
	time.Sleep(50 * time.Millisecond) // the watch runs in its own goroutine
	if n := cuts.Load(); n != 0 {
		t.Fatalf("a context that ended with no call in progress cut %d times", n)
	}
	// A call under the ended context is cut at once.
	end := in.during(session)
	waitCuts(1)
	end()

	// A new interrupter: the session ends during a call.
	cuts.Store(0)
	in = newInterrupter(func() { cuts.Add(1) })
	session, stop = context.WithCancel(context.Background())
	end = in.during(session)
	stop()
	waitCuts(1)
	end()

	// A call under another context is watched on its own.
	other, stopOther := context.WithCancel(context.Background())
	end = in.during(other)
	stopOther()
	waitCuts(2)
	end()
	// once never becomes the watched context, and cuts nothing after end.
	in = newInterrupter(func() { cuts.Add(1) })
	cuts.Store(0)
	call, stopCall := context.WithCancel(context.Background())
	in.once(call)()
	stopCall()
	time.Sleep(50 * time.Millisecond)
	if cuts.Load() != 0 || in.watched != nil {
		t.Fatalf("once: %d cuts, watched %v", cuts.Load(), in.watched)
	}
}

// TestInterrupterAllocatesNothingPerCall: the watch on the session context
// is set up once; each publish only counts itself in and out.
func TestInterrupterAllocatesNothingPerCall(t *testing.T) {
	in := newInterrupter(func() {})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	in.during(ctx)()
	if n := testing.AllocsPerRun(1000, func() { in.during(ctx)() }); n != 0 {
		t.Fatalf("%v allocations per call", n)
	}
}
