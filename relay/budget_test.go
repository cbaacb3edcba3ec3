package relay

import "testing"

func TestBudget(t *testing.T) {
	b := newBudget(100)
	if ok, _ := b.acquire(60); !ok {
		t.Fatal("60 of 100 bytes refused")
	}
	ok, room := b.acquire(50)
	if ok || room == nil {
		t.Fatal("110 of 100 bytes taken")
	}
	select {
	case <-room:
		t.Fatal("room signalled before a release")
	default:
	}
	b.release(60)
	select {
	case <-room:
	default:
		t.Fatal("release did not signal the waiter")
	}
	if ok, _ := b.acquire(50); !ok {
		t.Fatal("50 bytes refused after the release")
	}
	b.release(50)

	// An event larger than the limit passes alone, never beside another.
	if ok, _ := b.acquire(500); !ok {
		t.Fatal("an event larger than the limit never passes")
	}
	if ok, _ := b.acquire(1); ok {
		t.Fatal("a second event passed beside one larger than the limit")
	}
	b.release(500)
	if got := b.inUse(); got != 0 {
		t.Fatalf("%d bytes in use after every release", got)
	}
}

// TestNextSweepPage: the sweep's pages start at one row, at most double,
// and hold about sweepPageBytes.
func TestNextSweepPage(t *testing.T) {
	for _, c := range []struct{ fetched, n, bytes, want int }{
		{1, 1, 100, 2},                      // small rows: double
		{512, 512, 512 * 100, maxSweepPage}, // up to the cap
		{1000, 1000, 1000 * 100, maxSweepPage},
		{1, 1, 1 << 20, 2}, // 1 MB rows: 4 a page, reached by doubling
		{2, 2, 2 << 20, 4},
		{4, 4, 4 << 20, 4},
		{8, 8, 8 << 20, 4},          // shrinks at once
		{16, 16, 16 * (8 << 20), 1}, // rows over the page bytes: one at a time
		{1000, 0, 0, maxSweepPage},  // the end: nothing read
	} {
		if got := nextSweepPage(c.fetched, c.n, c.bytes); got != c.want {
			t.Errorf("nextSweepPage(%d, %d, %d) = %d, want %d", c.fetched, c.n, c.bytes, got, c.want)
		}
	}
}
