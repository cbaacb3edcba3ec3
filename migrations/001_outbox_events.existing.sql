-- A table of the application's own layout, read through RELAY_COLUMNS
-- (`migrate --layout existing`, the default when RELAY_COLUMNS maps
-- columns): it must exist, and keeps every column as it is. Only the
-- relay's published_at is added (a change to the catalog only, no
-- rewrite), and relay_seq by 004.
--
-- Rows already in the table count as published, as of now: whatever
-- delivered them before the relay did. `migrate --publish-existing` adds
-- the column without that default, and the relay's first table sweep then
-- publishes every row there.
SET LOCAL lock_timeout = '5s';
DO $$
BEGIN
  IF to_regclass({{table_literal}}) IS NULL THEN
    RAISE EXCEPTION 'table % does not exist: with a RELAY_COLUMNS mapping, migrate adds the relay''s columns to an existing table and creates none (create it first, or use --layout default or debezium)', {{table_literal}};
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_attribute
      WHERE attrelid = {{table_literal}}::regclass AND attname = 'published_at' AND NOT attisdropped) THEN
    ALTER TABLE {{table}} ADD COLUMN published_at timestamptz DEFAULT {{existing_published_at}};
    ALTER TABLE {{table}} ALTER COLUMN published_at DROP DEFAULT;
  END IF;
END
$$;
