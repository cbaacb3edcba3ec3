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
//	    poison events take their policy here (dead-letter, retry). A
//	    RabbitMQ nack is about a queue, not the event: maxNacks of them in
//	    a row end the session, and only an event whose nacks end
//	    maxNackSessions sessions in a row, over Options.NackPoisonAfter,
//	    is dead-lettered (pipeline.go).
//	  - marker sets published_at in batches (UPDATE … WHERE id = ANY($1) AND
//	    published_at IS NULL) and retries rows the UPDATE did not reach
//	    because their transaction is not yet visible (invariant 5). Only then
//	    does it finish the events in the tracker.
//
// Reading it top-down: Run (relay.go) loops over sessions; session
// (session.go) claims the slot, settles its state (slotState), connects,
// creates the slot with its sweep if needed (createSlot), and runs the
// pipeline (run); read and stream feed it; publish and confirm
// (pipeline.go) and mark (mark.go) finish each item's fate; statusNow
// acknowledges. The collaborators are behind the interfaces of seams.go,
// which the simulator (sim_test.go, docs/simulation.md) replaces.
//
// # Failures
//
// A failure on the broker's side cancels the pipeline: what was not
// confirmed is published again by the next session. A failure on the
// database's side (the stream, a mark, the replay check) or the ownership
// lock lost (while sweeping or streaming) halts the session instead (session.halt): the
// reader stops, the publisher publishes nothing more of what was read (the
// next session reads it again), and what was published is confirmed (for
// up to 5 s) and carried to the next session, which only marks it. A
// graceful stop (SIGTERM) reads on to the current transaction's commit,
// for at most half of RELAY_SHUTDOWN_TIMEOUT, and drains.
//
// # Guarantees
//
// Ack after done (1): the flushed LSN sent to PostgreSQL is the end of the
// longest prefix of transactions whose events are all confirmed and marked.
// Order (3): one channel, publish in stream order, so commit order and insert
// order hold. Nothing lost (2): every failure ends the session; the next one
// starts from the slot's confirmed position and republishes whatever was not
// acknowledged. Few duplicates (4): on replay, rows already marked are
// skipped (checked in batches until the first unmarked row still in the
// table, since marks follow stream order), and ids confirmed but not marked when a session
// failed (in the marker's batch, even one it was still filling, on their
// way to it, or in the confirmer's hand-over) are carried to the next one
// and only marked. Published twice:
// events confirmed but unmarked when the process died, and events not yet
// confirmed when the broker connection failed; message_id lets consumers
// drop them.
// Bounded memory (9): the channels bound events, the in-flight budget
// (RELAY_MAX_INFLIGHT_BYTES, budget.go) bounds their bytes (payload and
// text fields). The reader acquires an event's bytes before it enters the
// pipeline (the table sweep too) and keeps the stream alive while it
// waits; the confirmer releases them with the broker's verdict and drops
// all but the id, so the marker and the carry hold ids only. An event
// larger than the budget passes alone. The table sweep reads pages of rows
// before they enter the budget, so its pages are bounded in bytes too
// (sweep.go).
// The table is the backstop (7): when the relay creates its slot (first
// start, or after the slot was lost) it publishes the unpublished rows
// visible in the slot's exported snapshot before streaming, in insert order
// (relay_seq; rows from before migration 004 first, by occurred_at, id),
// each turned into an event by the stream's own rules (decoder.EventFromRow)
// so that what the stream would dead-letter is dead-lettered here too.
// One owner per slot (10): a session takes the slot's advisory lock before
// it looks at the slot and holds it until it ends (owner.go); a relay that
// cannot take it stands by, and never drops, creates, sweeps or streams.
// Never harms the database (12): every session runs under the relay's own
// settings (internal/pgsession), slot creation names what it waits for
// (slotwait.go), and an error caused by a setting names it (hint.go).
//
// # The relay as a synchronous standby (invariant 1's exception, 12)
//
// synchronous_standby_names = '*' matches logical walsenders too, so the
// relay can be chosen as the synchronous standby (syncstate.go). A commit
// that waits for its synchronous standby is already in the WAL (the
// walsender sends only flushed WAL, so every streamed transaction is
// committed) but still in the proc array: invisible to other sessions, and
// pg_xact_status says 'in progress' (measured on PostgreSQL 15). Its rows
// become visible only once the relay acknowledges their LSN, and the relay
// acknowledges only marked rows: without the exception, every commit hangs.
//
// So while commits may wait for the relay (its walsender's sync_state is
// sync, quorum or potential, or unknown with a setting that matches it, or
// RELAY_SYNC_PUBLISH), when rows of a streamed transaction are invisible to
// the mark, the marker records (slot, id, xid) in outbox_relay_confirmed in
// one local commit (synchronous_commit = local: it never waits on the
// relay), and only then finishes those events in the tracker. The record
// stands in for published_at: the replay filter (replayRows) counts a
// recorded id as published, and so must the table sweep. Each marker round,
// and at session start, one statement sets published_at on the recorded
// rows now visible and deletes their records (and the records of rows
// deleted meanwhile), so an id is always either recorded or marked. Rows
// invisible for a second while the relay is not a candidate make the marker
// check its sync_state at once, not at the next periodic check.
//
// A crash, step by step:
//   - before the broker confirms: nothing recorded or acknowledged; the
//     transaction is replayed and published again (the usual window);
//   - confirmed, before the record commits: the same, a duplicate at most;
//   - record committed, before the status update: the LSN is not
//     acknowledged and the commit still waits; the transaction is
//     replayed, the filter finds the records and skips the events (not
//     published twice); the skipped events finish, the LSN is acknowledged,
//     the commit is released, and the marker marks the rows from their
//     records once visible;
//   - acknowledged, before the mark: the slot does not replay it; the
//     session start marks the rows from their records, and a table sweep
//     (after the slot is lost) skips recorded ids;
//   - during the completion: one statement, so either marked and record
//     deleted, or neither.
//
// A crash of PostgreSQL keeps the record (a local commit is flushed before
// it returns). A failover to a physical standby that had not received the
// record publishes those rows again (duplicates, never loss); the waiting
// commit itself may be lost with the old primary, and then its events,
// already published, describe a transaction that did not survive. That is
// the same as without a synchronous standby: logical decoding on
// PostgreSQL 15 does not wait for physical standbys.
//
// No LSN is acknowledged before the broker confirms, so while the relay is
// the synchronous standby every commit in the cluster also waits for the
// broker (measured: a 4.7 s RabbitMQ memory alarm held every commit 4.7 s).
// Unless an operator asked for it (RELAY_SYNC_PUBLISH), a relay that is the
// synchronous standby (sync or quorum) and finishes no event for 3 s with
// work in flight, while another walsender is a candidate too, steps aside
// (checkStall): it closes its replication
// connection, PostgreSQL picks the other standby, and the relay waits 30 s
// before it connects again (it would take the lowest walsender slot, and
// the role, again). Its unfinished events are replayed.
//
// While commits may wait for it (a candidate, or RELAY_SYNC_PUBLISH), the
// reader answers as soon as the done position moves: on a keepalive that
// moves it (the walsender of a synchronous standby does not ask for
// replies but waits for them), when the marker finishes events
// (notifyDone wakes the reader), and after an empty transaction. At most
// one update per promptGap. Otherwise the status interval stands, and a
// keepalive costs no more than before.
package relay
