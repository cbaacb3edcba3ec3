package sink

import (
	"bytes"
	"errors"
	"net"
	"testing"
)

// recordingConn records each Write the coalescing layer makes.
type recordingConn struct {
	net.Conn
	writes [][]byte
	err    error
}

func (c *recordingConn) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	c.writes = append(c.writes, bytes.Clone(p))
	return len(p), nil
}

func TestCoalescingConnWritesThroughUnlessHeld(t *testing.T) {
	rec := &recordingConn{}
	c := newCoalescingConn(rec)
	for _, s := range []string{"a", "b"} {
		if _, err := c.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	if len(rec.writes) != 2 {
		t.Fatalf("not held: %d writes reached the socket, want 2", len(rec.writes))
	}
}

func TestCoalescingConnHoldsUntilFlush(t *testing.T) {
	rec := &recordingConn{}
	c := newCoalescingConn(rec)
	c.Hold()
	for _, s := range []string{"frame1", "frame2", "frame3"} {
		if n, err := c.Write([]byte(s)); err != nil || n != len(s) {
			t.Fatalf("held Write = %d, %v", n, err)
		}
	}
	if len(rec.writes) != 0 {
		t.Fatalf("%d writes reached the socket while held", len(rec.writes))
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 1 || string(rec.writes[0]) != "frame1frame2frame3" {
		t.Fatalf("Flush wrote %q, want one write of the three frames in order", rec.writes)
	}
	// Flush also ends holding: the next write goes out at once.
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if len(rec.writes) != 2 {
		t.Fatalf("after Flush a write was held back")
	}
}

func TestCoalescingConnBoundsItsBuffer(t *testing.T) {
	rec := &recordingConn{}
	c := newCoalescingConn(rec)
	c.Hold()
	frame := bytes.Repeat([]byte("f"), 1000)
	total := 0
	for range 3 * coalesceLimit / len(frame) {
		if _, err := c.Write(frame); err != nil {
			t.Fatal(err)
		}
		total += len(frame)
	}
	big := bytes.Repeat([]byte("B"), 2*coalesceLimit)
	if _, err := c.Write(big); err != nil {
		t.Fatal(err)
	}
	total += len(big)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	written := 0
	for _, w := range rec.writes {
		if len(w) > coalesceLimit && !bytes.Equal(w, big) {
			t.Fatalf("a write of %d bytes: the buffer grew past its limit of %d", len(w), coalesceLimit)
		}
		written += len(w)
	}
	if written != total {
		t.Fatalf("wrote %d bytes, want %d", written, total)
	}
	if !bytes.Equal(rec.writes[len(rec.writes)-1], big) {
		t.Fatal("a write larger than the limit should go out on its own, after what was buffered")
	}
}

func TestCoalescingConnReportsAFailedWrite(t *testing.T) {
	broken := errors.New("connection reset")
	rec := &recordingConn{}
	c := newCoalescingConn(rec)
	c.Hold()
	if _, err := c.Write([]byte("frame")); err != nil {
		t.Fatal(err)
	}
	rec.err = broken
	if err := c.Flush(); !errors.Is(err, broken) {
		t.Fatalf("Flush = %v, want the socket's error", err)
	}
	if _, err := c.Write([]byte("later")); !errors.Is(err, broken) {
		t.Fatalf("Write after a failed flush = %v, want the same error", err)
	}
	if err := c.Flush(); !errors.Is(err, broken) {
		t.Fatalf("second Flush = %v, want the same error", err)
	}
}
