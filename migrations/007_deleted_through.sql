-- RELAY_ON_PUBLISHED=delete: the stream position (commit LSN, and the
-- event's place in its transaction) of the last event the relay deleted or
-- recorded as confirmed, written in the statement that does it. On a
-- replay, a missing row at or before it was published (marks follow stream
-- order); one after it was deleted by the application before the relay
-- published it, and is published. Without it, an application that deletes each row
-- in the transaction that inserts it (Debezium's habit) had every event of
-- a replay skipped.
ALTER TABLE outbox_relay_slot_state ADD COLUMN IF NOT EXISTS deleted_through pg_lsn,
  ADD COLUMN IF NOT EXISTS deleted_through_event int;
