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
