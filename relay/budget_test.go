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
func TestSweepPager(t *testing.T) {
	// Each step: the page size asked for, then the rows read and the
	// largest of them.
	for _, c := range []struct {
		name  string
		pages [][3]int // want, n, largest
	}{
		{"small rows double up to the cap", [][3]int{{firstSweepPage, 4, 100}, {8, 8, 100}, {16, 16, 100}, {32, 32, 100},
			{64, 64, 100}, {128, 128, 100}, {256, 256, 100}, {512, 512, 100}, {maxSweepPage, 1000, 100}, {maxSweepPage, 0, 0}}},
		{"1 MB rows: 4 a page", [][3]int{{firstSweepPage, 4, 1 << 20}, {4, 4, 1 << 20}, {4, 0, 0}}},
		{"rows grow part way: shrinks at once", [][3]int{{firstSweepPage, 4, 100}, {8, 8, 1 << 20}, {4, 4, 100}, {4, 0, 0}}},
		{"rows over the page bytes: one at a time", [][3]int{{firstSweepPage, 4, 8 << 20}, {1, 1, 100}, {1, 0, 0}}},
	} {
		var p sweepPager
		for i, step := range c.pages {
			if got := p.next(); got != step[0] {
				t.Fatalf("%s: page %d asks for %d rows, want %d", c.name, i, got, step[0])
			}
			p.saw(step[1], step[2])
		}
	}
}
