#!/usr/bin/env bash
# markcost.sh: the WAL of recording "published" in each table layout we
# considered for RELAY_ON_PUBLISHED=mark (issue 13), against the WAL of the
# insert, on the local PostgreSQL (wal_level must be logical, as the relay
# needs). For each layout it creates a scratch database, inserts ROWS events
# of ~300-byte payloads in batches of 100 and, one batch behind, records the
# previous batch as the relay does (one statement per batch), then prints
# WAL bytes per event for both, HOT updates, dead tuples and table pages.
#
#   scripts/markcost.sh [ROWS]        (default 50000; run it 3 times, take medians)
#
# Layouts:
#   current      the migrations' table: partial indexes WHERE published_at IS NULL
#   ff70-full    fillfactor 70, a full index on relay_seq (no index names published_at)
#   ff50-full    fillfactor 50, the same
#   delete       the migrations' table, rows deleted instead of marked
set -euo pipefail
ROWS="${1:-50000}"
batches=$((ROWS / 100))
P=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -qAtX -v ON_ERROR_STOP=1)
partial="CREATE INDEX ON t (occurred_at) WHERE published_at IS NULL; CREATE INDEX ON t (relay_seq) WHERE published_at IS NULL;"

run() {
	local name="$1" ddl="$2" mode="$3" db="markcost_${1//-/_}_$$"
	"${P[@]}" -c "CREATE DATABASE $db" >/dev/null
	trap '"${P[@]}" -c "DROP DATABASE IF EXISTS '"$db"'" >/dev/null' RETURN
	"${P[@]}" -d "$db" <<SQL
SET client_min_messages = warning;
CREATE SEQUENCE s;
CREATE TABLE t (id uuid PRIMARY KEY, aggregate_type text NOT NULL, aggregate_id uuid NOT NULL,
  event_type text NOT NULL, payload jsonb NOT NULL, occurred_at timestamptz NOT NULL DEFAULT now(),
  published_at timestamptz, relay_seq bigint DEFAULT nextval('s'));
ALTER TABLE t SET (autovacuum_enabled = false);
$ddl
CREATE TEMP TABLE m (ins numeric, own numeric);
DO \$\$ DECLARE l0 pg_lsn; ins numeric := 0; own numeric := 0; ids uuid[]; prev uuid[]; BEGIN
  FOR i IN 1..$batches LOOP
    SELECT array_agg(gen_random_uuid()) INTO ids FROM generate_series(1, 100);
    l0 := pg_current_wal_lsn();
    INSERT INTO t (id, aggregate_type, aggregate_id, event_type, payload)
      SELECT u, 'order', gen_random_uuid(), 'order.created', jsonb_build_object('x', repeat('p', 280)) FROM unnest(ids) u;
    ins := ins + pg_wal_lsn_diff(pg_current_wal_lsn(), l0);
    IF prev IS NOT NULL THEN
      l0 := pg_current_wal_lsn();
      IF '$mode' = 'delete' THEN DELETE FROM t WHERE id = ANY(prev) AND published_at IS NULL;
      ELSE UPDATE t SET published_at = now() WHERE id = ANY(prev) AND published_at IS NULL; END IF;
      own := own + pg_wal_lsn_diff(pg_current_wal_lsn(), l0);
    END IF;
    prev := ids;
  END LOOP;
  INSERT INTO m VALUES (ins / ($batches * 100), own / (($batches - 1) * 100));
END \$\$;
SELECT pg_stat_force_next_flush();
SELECT format('%-10s insert %4s B/event   %-6s %4s B/event (%s%% of the insert)   HOT %s of %s   dead tuples %s   pages %s',
  '$name', round(m.ins), '$mode', round(m.own), round(100 * m.own / m.ins), s.n_tup_hot_upd, s.n_tup_upd, s.n_dead_tup,
  pg_relation_size('t') / 8192)
FROM m, pg_stat_user_tables s WHERE s.relname = 't';
SQL
}

[ "$("${P[@]}" -c 'SHOW wal_level')" = logical ] || { echo "markcost: wal_level is not logical (scripts/test-env.sh sets it)" >&2; exit 1; }
run current "$partial" mark | grep -v '^$'
run ff70-full "ALTER TABLE t SET (fillfactor = 70); CREATE INDEX ON t (relay_seq);" mark | grep -v '^$'
run ff50-full "ALTER TABLE t SET (fillfactor = 50); CREATE INDEX ON t (relay_seq);" mark | grep -v '^$'
run delete "$partial" delete | grep -v '^$'
