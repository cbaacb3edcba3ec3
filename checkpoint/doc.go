// Package checkpoint decides which WAL position the relay may acknowledge.
//
// The relay keeps three positions:
//
//   - received: the newest WAL position read from the replication stream;
//   - done: the end LSN of the longest contiguous prefix of transactions whose
//     every event has been confirmed by the broker and marked published;
//   - acknowledged: the position last sent to PostgreSQL as flushed.
//
// The acknowledged position never passes done, and done only moves over a
// contiguous prefix: a finished transaction behind an unfinished one does not
// move it. That is invariant 1 of DESIGN.md ("ack after done"); the Tracker
// is the only place that computes the position the relay may acknowledge.
//
// When nothing is in flight, AdvanceIdle lets done follow the server's WAL end
// from keepalives, so an idle outbox on a busy cluster does not hold WAL
// (invariant 6).
//
// Memory is bounded by the transactions with events: an empty transaction
// (servers before PostgreSQL 15 send one for every transaction in the
// database) behind an unfinished one is folded into the entry before it.
package checkpoint
