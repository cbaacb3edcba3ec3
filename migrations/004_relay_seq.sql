-- Insert order, for the table sweep (invariant 3). The sweep publishes the
-- rows the slot will never deliver, and must publish them in the order the
-- stream would have: neither ids (any UUID version) nor occurred_at (ties
-- within a transaction, any value an application sets) say what that is.
-- A sequence does: it numbers rows in insert order within a transaction,
-- and across transactions that write the same aggregate under a lock, in
-- their commit order.
--
-- A plain column with a sequence default rather than an identity column:
-- adding it does not rewrite the table, and rows already there keep NULL
-- (the sweep takes those first, in the older occurred_at, id order).
CREATE SEQUENCE IF NOT EXISTS {{relay_seq_sequence}};
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS relay_seq bigint;
ALTER TABLE {{table}} ALTER COLUMN relay_seq SET DEFAULT nextval({{relay_seq_sequence_literal}}::regclass);
ALTER SEQUENCE {{relay_seq_sequence}} OWNED BY {{table}}.relay_seq;
CREATE INDEX IF NOT EXISTS {{relay_seq_index}}
  ON {{table}} (relay_seq NULLS FIRST)
  WHERE published_at IS NULL;
