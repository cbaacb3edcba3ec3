// Package relay is the engine: it wires the replication stream, the decoder,
// the broker and the checkpoint into one pipeline and keeps it running
// across failures.
//
// # Pipeline
//
// One session is four goroutines joined by bounded channels:
//
//		reader ──items──▶ publisher ──pending──▶ confirmer ──confirmed──▶ marker
//
//	  - reader owns the replication connection (no other goroutine touches
//	    it): it decodes messages, registers transactions with the checkpoint
//	    tracker, sends status updates on an interval and at once when the
//	    server asks, and acknowledges only tracker.Done().
//	  - publisher publishes without waiting. The pending channel's capacity is
//	    RELAY_PUBLISH_WINDOW, so a slow broker slows the reader instead of
//	    filling memory (invariant 9).
//	  - confirmer waits for confirms in publish order; returned, nacked and
//	    poison events take their policy here (dead-letter, retry).
//	  - marker sets published_at in batches (UPDATE … WHERE id = ANY($1) AND
//	    published_at IS NULL) and retries rows the UPDATE did not reach
//	    because their transaction is not yet visible (invariant 5). Only then
//	    does it finish the events in the tracker.
//
// # Guarantees
//
// Ack after done (1): the flushed LSN sent to PostgreSQL is the end of the
// longest prefix of transactions whose events are all confirmed and marked.
// Order (3): one channel, publish in stream order, so commit order and insert
// order hold. Nothing lost (2): every failure ends the session; the next one
// starts from the slot's confirmed position and republishes whatever was not
// acknowledged. Few duplicates (4): on replay, rows already marked are
// skipped (checked in batches until the first unmarked row, since marks
// follow stream order), and ids confirmed but not marked when a session
// failed (in the marker's batch, even one it was still filling, on their
// way to it, or in the confirmer's hand-over) are carried to the next one
// and only marked. Published twice:
// events confirmed but unmarked when the process died, and events not yet
// confirmed when the broker connection failed; message_id lets consumers
// drop them.
// Bounded memory (9): the channels bound events, the in-flight budget
// (RELAY_MAX_INFLIGHT_BYTES, budget.go) bounds their payload bytes. The
// reader acquires an event's bytes before it enters the pipeline (the
// table sweep too) and keeps the stream alive while it waits; the
// confirmer releases them with the broker's verdict and drops the payload,
// so the marker and the carry hold ids only. An event larger than the
// budget passes alone.
// The table is the backstop (7): when the relay creates its slot (first
// start, or after the slot was lost) it publishes the unpublished rows
// visible in the slot's exported snapshot before streaming.
package relay
