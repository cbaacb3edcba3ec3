// Package decoder turns pgoutput messages (logical replication protocol
// version 1, no streaming) into the outbox events the relay publishes.
//
// It is pure code: no I/O, no goroutines, no logging. The replication reader
// hands it the WALData of every XLogData frame, in order, and gets back a
// [Message]: a transaction's [Begin], each [Event] inserted into the outbox
// table, and its [Commit] (whose EndLSN is what the relay acknowledges once
// every event of the transaction is done). Everything else in the stream
// (other tables, Update, Delete, Truncate, Type, Origin, logical messages)
// decodes to [KindNone].
//
// # The copy rule
//
// The input slice belongs to the replication connection and is overwritten
// after Decode returns. Nothing returned aliases it: strings are copied and
// Event.Payload is a private copy. The hot path (an Insert on the outbox
// table) makes two allocations: one for the four text fields together and
// one for the payload.
//
// # Relations and columns
//
// pgoutput sends a Relation message before the first change on a table in a
// session, and again after its definition changes (ALTER TABLE ADD or DROP
// COLUMN mid-stream). The decoder caches relations by ID; a later Relation
// message replaces the entry. The configured table is recognised by exact
// namespace and name, and its columns are found by name, never by position:
// id, aggregate_type, aggregate_id, event_type, payload and occurred_at are
// required, published_at is optional, and any other column is ignored. A
// Relation for the outbox table that lacks a required column is an error
// wrapping [ErrSchema], and so is every later Insert on that relation until
// a corrected Relation arrives. An Insert on a relation ID never announced
// is an error wrapping [ErrProtocol].
//
// # Values
//
// Values arrive in text format. A row that cannot become a message (a NULL
// or missing value in a required column, an occurred_at such as infinity or
// a BC date) is still returned as a [KindEvent], with Event.Invalid giving
// the reason, so the relay can dead-letter it instead of stalling or
// silently skipping it. Event.Published reports that the row was inserted
// with published_at already set; the relay must not publish it. Payload is
// the column's text exactly as sent, and OccurredAt is in UTC.
//
// # Errors and state
//
// Structural problems (unknown message type, truncated message, bad
// lengths, trailing bytes, a change outside a transaction, Begin inside a
// transaction, Commit outside one) are errors wrapping [ErrProtocol]. Decode
// never panics. Use a new Decoder for each START_REPLICATION session: the
// server resends Relation messages in every session, and a session cut in
// the middle of a transaction leaves the old decoder inside it.
package decoder
