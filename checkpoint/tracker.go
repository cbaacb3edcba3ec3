package checkpoint

import (
	"sync"

	"github.com/jackc/pglogrepl"
)

// Tx is one transaction as the tracker sees it. A pointer to it travels with
// each of the transaction's events through the pipeline.
type Tx struct {
	endLSN  pglogrepl.LSN
	pending int
	events  bool // an event was ever added
	closed  bool
	// through is the end of the last empty transaction coalesced into this
	// one: once this one is done, so are they.
	through pglogrepl.LSN
}

// Tracker computes the done position. It is safe for concurrent use: the
// replication reader opens and closes transactions, the pipeline finishes
// events.
type Tracker struct {
	mu       sync.Mutex
	queue    []*Tx // open or unfinished transactions, in commit order
	head     int   // queue[head:] is live; the slice is compacted lazily
	done     pglogrepl.LSN
	acked    pglogrepl.LSN
	received pglogrepl.LSN
}

// New returns a tracker whose done and acknowledged positions start at start
// (the slot's confirmed position, or zero).
func New(start pglogrepl.LSN) *Tracker {
	return &Tracker{done: start, acked: start, received: start}
}

// Begin opens a transaction. Transactions must be opened in commit order,
// which is the order the replication stream delivers them in.
func (t *Tracker) Begin() *Tx {
	tx := &Tx{}
	t.mu.Lock()
	t.queue = append(t.queue, tx)
	t.mu.Unlock()
	return tx
}

// Add records one more event of tx that must finish before tx is done.
func (t *Tracker) Add(tx *Tx) {
	t.mu.Lock()
	tx.pending++
	tx.events = true
	t.mu.Unlock()
}

// Close records that every event of tx has been added and that the
// transaction ends at endLSN. An endLSN of zero (a table sweep, not a stream
// transaction) finishes the entry without moving the position.
//
// A transaction without events behind an unfinished one is folded into the
// entry before it, so the tracker holds one entry per transaction with
// events (plus the open one), however many empty transactions a server
// before PostgreSQL 15 sends while the head waits for the broker.
func (t *Tracker) Close(tx *Tx, endLSN pglogrepl.LSN) {
	t.mu.Lock()
	tx.closed = true
	tx.endLSN = endLSN
	if last := len(t.queue) - 1; !tx.events && last > t.head && t.queue[last] == tx {
		prev := t.queue[last-1]
		prev.through = max(prev.through, tx.endLSN, tx.through)
		t.queue[last] = nil
		t.queue = t.queue[:last]
	}
	t.advance()
	t.mu.Unlock()
}

// Finish records that n events of tx are confirmed and marked.
func (t *Tracker) Finish(tx *Tx, n int) {
	t.mu.Lock()
	tx.pending -= n
	if tx.pending < 0 {
		t.mu.Unlock()
		panic("checkpoint: more events finished than added") // a pipeline bug, never input
	}
	t.advance()
	t.mu.Unlock()
}

// advance pops finished transactions off the front. Callers hold mu.
func (t *Tracker) advance() {
	for t.head < len(t.queue) {
		tx := t.queue[t.head]
		if !tx.closed || tx.pending > 0 {
			break
		}
		if end := max(tx.endLSN, tx.through); end > t.done {
			t.done = end
		}
		t.queue[t.head] = nil
		t.head++
	}
	if t.head == len(t.queue) {
		t.queue = t.queue[:0]
		t.head = 0
	} else if t.head > 1024 && t.head*2 > len(t.queue) {
		n := copy(t.queue, t.queue[t.head:])
		clear(t.queue[n:])
		t.queue = t.queue[:n]
		t.head = 0
	}
}

// Received records the newest WAL position read from the stream.
func (t *Tracker) Received(lsn pglogrepl.LSN) {
	t.mu.Lock()
	if lsn > t.received {
		t.received = lsn
	}
	t.mu.Unlock()
}

// AdvanceIdle moves done to walEnd when no transaction is open or unfinished,
// and reports whether it did. The caller must have handed every message read
// before the keepalive carrying walEnd to the tracker first.
func (t *Tracker) AdvanceIdle(walEnd pglogrepl.LSN) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.head != len(t.queue) || walEnd <= t.done {
		return false
	}
	t.done = walEnd
	return true
}

// Done returns the position that may be acknowledged.
func (t *Tracker) Done() pglogrepl.LSN {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.done
}

// Acknowledge records that pos was sent to the server. It returns the
// position actually recorded, which never passes done.
func (t *Tracker) Acknowledge(pos pglogrepl.LSN) pglogrepl.LSN {
	t.mu.Lock()
	defer t.mu.Unlock()
	if pos > t.done {
		pos = t.done
	}
	if pos > t.acked {
		t.acked = pos
	}
	return t.acked
}

// Positions returns received, done and acknowledged.
func (t *Tracker) Positions() (received, done, acked pglogrepl.LSN) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.received, t.done, t.acked
}

// InFlight returns the number of transactions not yet done.
func (t *Tracker) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.queue) - t.head
}
