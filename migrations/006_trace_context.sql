-- The producer's W3C trace context (https://www.w3.org/TR/trace-context/):
-- the outbox package writes the traceparent and tracestate of the span in
-- the inserting context, and the relay sends them as headers of the same
-- names, so that a consumer continues the producer's trace. NULL: no trace.
--
-- Nullable columns without a default: adding them changes only the catalog
-- (no table rewrite), and rows already there read as NULL.
--
-- lock_timeout: as in 004, ALTER TABLE waits for an ACCESS EXCLUSIVE lock
-- and every producer's insert would queue behind it while it waits.
SET LOCAL lock_timeout = '5s';
ALTER TABLE {{table}}
  ADD COLUMN IF NOT EXISTS traceparent text,
  ADD COLUMN IF NOT EXISTS tracestate text;
