-- Least-privilege role for outbox-relay.
--
-- Run it as the owner of the outbox table (or a superuser), in the
-- application's database, AFTER `outbox-relay migrate` has run as that
-- owner. migrate creates the table, its index, outbox_relay_slot_state,
-- outbox_relay_confirmed and the publication; creating a publication FOR
-- TABLE needs ownership of the table, which the relay's role deliberately
-- does not have. The relay then
-- runs as this role and only reads, marks and (with retention) deletes.
--
--   psql -v ON_ERROR_STOP=1 -d appdb \
--        -v relay_password="$(cat relay-password)" \
--        -f deploy/least-privilege.sql
--
-- Variables (psql -v name=value), all optional:
--   relay_role      the role to create               (outbox_relay)
--   relay_password  its password                     (placeholder: change it!)
--   outbox_schema   schema of the outbox table       (public)
--   outbox_table    the outbox table                 (outbox_events)
--   state_schema    schema of outbox_relay_slot_state and
--                   outbox_relay_confirmed (public: where migrate created
--                   them, the first schema on its search_path)
--   retention       true to grant DELETE, needed by `outbox-relay prune`,
--                   RELAY_RETENTION and RELAY_ON_PUBLISHED=delete (false)
--
-- Producers (the application roles that insert events) need only INSERT:
-- since migration 004 relay_seq's default is a SECURITY DEFINER function
-- (<outbox_table>_relay_seq_next()), which PUBLIC may execute unless a DBA
-- revoked that default; then GRANT EXECUTE on it to the producers.
--
-- What the relay does with each privilege:
--   LOGIN REPLICATION   open the replication connection, create its slot,
--                       read pg_replication_slots, and drop its own slot when
--                       it is lost (pg_drop_replication_slot). REPLICATION is
--                       a broad attribute: a replication connection can read
--                       every change in the database. Restrict it in
--                       pg_hba.conf to the relay's hosts, e.g.
--                         hostssl appdb outbox_relay 10.0.0.0/24 scram-sha-256
--                       (for logical replication the database column is the
--                       database name, not the keyword "replication").
--   CONNECT, USAGE      reach the database and the schemas.
--   SELECT on the table the sweep of rows the stream cannot deliver, status,
--                       and the WHERE clauses of the mark and of prune.
--   UPDATE (published_at) only: mark rows published. No other column.
--   DELETE              only with retention (prune, RELAY_RETENTION) or
--                       RELAY_ON_PUBLISHED=delete.
--   SELECT, INSERT, UPDATE on outbox_relay_slot_state: whether the table
--                       sweep after creating the slot has finished.
--   SELECT, INSERT, DELETE on outbox_relay_confirmed: confirmed events whose
--                       rows were not visible yet to mark (a commit waiting
--                       for a synchronous standby); deleted once marked.
--   pg_monitor          optional: lets the relay read its walsender's
--                       sync_state in pg_stat_replication, to tell when it
--                       is a synchronous standby. Without it the relay
--                       assumes it may be whenever synchronous_standby_names
--                       is '*' or names it (GRANT pg_monitor TO outbox_relay).
--   EXECUTE on pg_logical_emit_message  PUBLIC has it by default; the
--                       relay's barrier with synchronous standbys
--                       (RELAY_WAIT_FOR_SYNC_STANDBY) and the heartbeat use it.
--                       If a DBA revoked it, GRANT it to the relay's role.
-- Nothing else: no CREATE anywhere, no ownership, no superuser. The relay
-- checks the publication exists and includes the table (pg_publication is
-- readable by everyone); it never creates or alters it.

\if :{?relay_role}
\else
  \set relay_role outbox_relay
\endif
\if :{?relay_password}
\else
  \warn 'least-privilege.sql: relay_password not set; using the placeholder "change-me". Set a real one: ALTER ROLE ... PASSWORD ...'
  \set relay_password change-me
\endif
\if :{?outbox_schema}
\else
  \set outbox_schema public
\endif
\if :{?outbox_table}
\else
  \set outbox_table outbox_events
\endif
\if :{?state_schema}
\else
  \set state_schema public
\endif
\if :{?retention}
\else
  \set retention false
\endif

BEGIN;

CREATE ROLE :"relay_role" LOGIN REPLICATION PASSWORD :'relay_password';

GRANT CONNECT ON DATABASE :"DBNAME" TO :"relay_role";
GRANT USAGE ON SCHEMA :"outbox_schema" TO :"relay_role";
GRANT USAGE ON SCHEMA :"state_schema" TO :"relay_role";

GRANT SELECT ON TABLE :"outbox_schema".:"outbox_table" TO :"relay_role";
GRANT UPDATE (published_at) ON TABLE :"outbox_schema".:"outbox_table" TO :"relay_role";

GRANT SELECT, INSERT, UPDATE ON TABLE :"state_schema".outbox_relay_slot_state TO :"relay_role";
GRANT SELECT, INSERT, DELETE ON TABLE :"state_schema".outbox_relay_confirmed TO :"relay_role";

\if :retention
GRANT DELETE ON TABLE :"outbox_schema".:"outbox_table" TO :"relay_role";
\endif

COMMIT;

-- To undo (as the same owner): REVOKE ALL ON ... FROM outbox_relay; then drop
-- the relay's slot (see docs/operating.md) and DROP ROLE outbox_relay.
