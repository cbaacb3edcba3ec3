-- Insert order, for the table sweep (invariant 3). The sweep publishes the
-- rows the slot will never deliver, and must publish them in the order the
-- stream would have: neither ids (any UUID version) nor occurred_at (ties
-- within a transaction, any value an application sets) say what that is.
-- A sequence does: it numbers rows in insert order within a transaction,
-- and across transactions that write the same aggregate under a lock taken
-- before the outbox insert, in their commit order.
--
-- A plain column with a default rather than an identity column: adding it
-- changes only the catalog (no table rewrite), and rows already there keep
-- NULL (the sweep takes those first, in the older occurred_at, id order).
-- The default is a SECURITY DEFINER function of the table's owner, so that
-- roles that insert into the outbox need no new grant (EXECUTE is PUBLIC's
-- by default; a serial column would need USAGE on the sequence for each).
--
-- lock_timeout: ALTER TABLE waits for an ACCESS EXCLUSIVE lock, and every
-- producer's insert would queue behind it while it waits. Better to fail and
-- be retried at a quieter moment.
SET LOCAL lock_timeout = '5s';
CREATE SEQUENCE IF NOT EXISTS {{relay_seq_sequence}};
CREATE OR REPLACE FUNCTION {{relay_seq_function}}() RETURNS bigint
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog
  AS $fn$ SELECT nextval({{relay_seq_sequence_literal}}::regclass) $fn$;
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS relay_seq bigint;
ALTER TABLE {{table}} ALTER COLUMN relay_seq SET DEFAULT {{relay_seq_function}}();
ALTER SEQUENCE {{relay_seq_sequence}} OWNED BY {{table}}.relay_seq;
-- The index scans the whole table once, with the table locked. On a large
-- table, create it beforehand without blocking writes and this skips it:
--   CREATE INDEX CONCURRENTLY outbox_events_relay_seq_idx
--     ON outbox_events (relay_seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS {{relay_seq_index}}
  ON {{table}} (relay_seq)
  WHERE published_at IS NULL;
