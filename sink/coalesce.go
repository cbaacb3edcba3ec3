package sink

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Batcher is implemented by publishers that can coalesce the writes of many
// publishes into few system calls. Between Hold and Flush, frames written to
// the connection (by Publish, DeadLetter or the library's heartbeats, from
// any goroutine) may be buffered instead of sent; Flush sends them and
// stops buffering.
//
// The caller that holds must Flush before it blocks on anything, above all
// before it waits for a confirmation or for room in its window: a
// confirmation cannot arrive for a message still in the buffer.
//
// A Flush blocked on a broker that stopped reading (RabbitMQ's resource
// alarms do that) returns when ctx ends; the connection is then unusable.
type Batcher interface {
	Hold()
	Flush(ctx context.Context) error
}

// coalesceLimit is the buffered size at which a held connection writes out
// anyway: about 100 small events, one TCP write instead of 100.
const coalesceLimit = 64 << 10

// coalescingConn is a net.Conn whose writes can be held back and sent in
// one write. amqp091 flushes its own buffer once per publish, so with a
// backlog each event would otherwise cost a write system call in the relay
// and a socket read in the broker.
//
// Write errors of buffered data surface from Flush (and from every later
// Write): a publish that returned nil is never taken as confirmed, since
// only the broker's ack confirms it, so nothing is lost by reporting late.
type coalescingConn struct {
	net.Conn
	interrupted atomic.Bool // writes fail from now on: see interrupt
	mu          sync.Mutex
	hold        bool
	buf         []byte
	err         error // sticky: the first failed write
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	return &coalescingConn{Conn: c}
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if !c.hold {
		return c.write(p)
	}
	if len(c.buf)+len(p) > coalesceLimit {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) >= coalesceLimit {
			return c.write(p)
		}
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

func (c *coalescingConn) write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if err != nil {
		c.err = err
	}
	return n, err
}

func (c *coalescingConn) flushLocked() error {
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.write(c.buf)
	c.buf = c.buf[:0] // never above coalesceLimit: larger writes bypass it
	return err
}

// Hold buffers writes until Flush.
func (c *coalescingConn) Hold() {
	c.mu.Lock()
	c.hold = true
	c.mu.Unlock()
}

// Flush writes what is buffered and stops buffering.
func (c *coalescingConn) Flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hold = false
	if c.err != nil {
		return c.err
	}
	return c.flushLocked()
}

// interrupt makes a write blocked in the connection, and every later one,
// fail at once. It does not take mu, which the blocked write holds: a
// broker that stops reading (a resource alarm) leaves Write blocked in the
// kernel with mu held, where nothing else could reach it.
func (c *coalescingConn) interrupt() {
	c.interrupted.Store(true)
	_ = c.Conn.SetWriteDeadline(time.Unix(1, 0))
}
