-- Debezium's outbox table (its outbox event router's documented layout),
-- when it does not exist yet, and the relay's published_at. An existing
-- table keeps its own columns as they are: only published_at is added, and
-- relay_seq by 004. Adding either changes only the catalog (no rewrite).
--
-- Rows already in the table count as published, as of now: Debezium
-- delivered them (adding the column with a constant default stores the
-- value once, in the catalog). `migrate --publish-existing` adds it without
-- one, and the relay's first table sweep then publishes every row there.
SET LOCAL lock_timeout = '5s';
CREATE TABLE IF NOT EXISTS {{table}} (
  id                 uuid PRIMARY KEY,
  aggregatetype      varchar(255) NOT NULL,
  aggregateid        varchar(255) NOT NULL,
  type               varchar(255) NOT NULL,
  payload            jsonb,
  tracingspancontext varchar(256)
);
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute
      WHERE attrelid = {{table_literal}}::regclass AND attname = 'published_at' AND NOT attisdropped) THEN
    ALTER TABLE {{table}} ADD COLUMN published_at timestamptz DEFAULT {{existing_published_at}};
    ALTER TABLE {{table}} ALTER COLUMN published_at DROP DEFAULT;
  END IF;
END
$$;
