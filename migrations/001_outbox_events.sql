-- The seed's outbox table, and a partial index so that finding unpublished
-- rows (status, the table sweep) never scans published history.
CREATE TABLE IF NOT EXISTS {{table}} (
  id             uuid PRIMARY KEY,
  aggregate_type text NOT NULL,
  aggregate_id   uuid NOT NULL,
  event_type     text NOT NULL,
  payload        jsonb NOT NULL,
  occurred_at    timestamptz NOT NULL DEFAULT now(),
  published_at   timestamptz
);

CREATE INDEX IF NOT EXISTS {{unpublished_index}}
  ON {{table}} (occurred_at)
  WHERE published_at IS NULL;
