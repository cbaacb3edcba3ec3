package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/config"
	"github.com/outbox-relay/outbox-relay/decoder"
)

// slotInfo is the slot's row in pg_replication_slots.
type slotInfo struct {
	exists    bool
	active    bool
	confirmed pglogrepl.LSN
	walStatus string
}

// preflight checks what the relay needs from the database before it opens
// the stream, and returns the slot's state. Problems an operator must fix
// wrap ErrMisconfigured and say how.
func (r *Relay) preflight(ctx context.Context) (slotInfo, error) {
	var si slotInfo
	var walLevel string
	if err := r.opt.Pool.QueryRow(ctx, `SHOW wal_level`).Scan(&walLevel); err != nil {
		return si, classifyPg(fmt.Errorf("connect to PostgreSQL: %w", err))
	}
	if walLevel != "logical" {
		return si, fmt.Errorf("%w: wal_level is %q; the relay needs wal_level = logical "+
			"(ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)", ErrMisconfigured, walLevel)
	}
	var pubExists, tableInPub bool
	err := r.opt.Pool.QueryRow(ctx, `SELECT
		EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
		EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`,
		r.cfg.Publication, r.schema, r.table).Scan(&pubExists, &tableInPub)
	if err != nil {
		return si, classifyPg(fmt.Errorf("check publication: %w", err))
	}
	if !pubExists {
		return si, fmt.Errorf("%w: publication %q (RELAY_PUBLICATION) does not exist; run `outbox-relay migrate`",
			ErrMisconfigured, r.cfg.Publication)
	}
	if !tableInPub {
		return si, fmt.Errorf("%w: publication %q does not include table %s (RELAY_TABLE)",
			ErrMisconfigured, r.cfg.Publication, r.cfg.Table)
	}
	if err := r.checkColumns(ctx); err != nil {
		return si, err
	}
	if err := r.checkWritePrivilege(ctx); err != nil {
		return si, err
	}
	if err := r.checkBarrierPrivilege(ctx); err != nil {
		return si, err
	}
	if err := r.findStateTables(ctx); err != nil {
		return si, err
	}

	var plugin, database string
	var confirmed *string
	var walStatus *string
	err = r.opt.Pool.QueryRow(ctx, `SELECT plugin, database, active, confirmed_flush_lsn::text, wal_status
		FROM pg_replication_slots WHERE slot_name = $1`, r.cfg.Slot).
		Scan(&plugin, &database, &si.active, &confirmed, &walStatus)
	if errors.Is(err, pgx.ErrNoRows) {
		return si, nil
	}
	if err != nil {
		return si, classifyPg(fmt.Errorf("read slot %q: %w", r.cfg.Slot, err))
	}
	si.exists = true
	if walStatus != nil {
		si.walStatus = *walStatus
	}
	var current string
	if err := r.opt.Pool.QueryRow(ctx, `SELECT current_database()`).Scan(&current); err != nil {
		return si, classifyPg(err)
	}
	if plugin != "pgoutput" || database != current {
		return si, fmt.Errorf("%w: slot %q (RELAY_SLOT) belongs to plugin %q in database %q; "+
			"the relay needs a pgoutput slot in %q: choose another RELAY_SLOT",
			ErrMisconfigured, r.cfg.Slot, plugin, database, current)
	}
	if confirmed != nil {
		if si.confirmed, err = pglogrepl.ParseLSN(*confirmed); err != nil {
			return si, fmt.Errorf("slot %q confirmed_flush_lsn: %w", r.cfg.Slot, err)
		}
	}
	return si, nil
}

// checkColumns checks that the table has every column the relay reads
// (RELAY_COLUMNS, RELAY_HEADER_COLUMNS) and the two it keeps itself
// (published_at, relay_seq), and notes which optional trace columns it has.
func (r *Relay) checkColumns(ctx context.Context) error {
	rows, err := r.opt.Pool.Query(ctx, `SELECT attname::text, format_type(atttypid, atttypmod)
		FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`, r.tableIdent)
	if err != nil {
		return classifyPg(fmt.Errorf("check table %s: %w", r.cfg.Table, err))
	}
	types := map[string]string{}
	for rows.Next() {
		var name, typ string
		if err := rows.Scan(&name, &typ); err != nil {
			return classifyPg(fmt.Errorf("check table %s: %w", r.cfg.Table, err))
		}
		types[name] = typ
	}
	if err := rows.Err(); err != nil {
		return classifyPg(fmt.Errorf("check table %s: %w", r.cfg.Table, err))
	}
	migrate := "`outbox-relay migrate`"
	if spec := strings.TrimSpace(r.cfg.ColumnsSpec); spec != "" && spec != "default" {
		migrate = "`outbox-relay migrate` with this RELAY_COLUMNS (it adds the relay's columns to an existing table and leaves the table's own as they are)"
	}
	var missing []string
	for _, f := range decoder.ColumnFields[:6] {
		if c := r.cols.Column(f); c != "" && types[c] == "" {
			missing = append(missing, fmt.Sprintf("%s (the %s column)", c, f))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: table %s has no column %s: set RELAY_COLUMNS to the table's columns (now %s)",
			ErrMisconfigured, r.cfg.Table, strings.Join(missing, ", "), r.cols.String())
	}
	for _, h := range r.cols.Headers {
		if types[h] == "" {
			missing = append(missing, h)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: table %s has no column %s, named in RELAY_HEADER_COLUMNS",
			ErrMisconfigured, r.cfg.Table, strings.Join(missing, ", "))
	}
	if t := types[r.cols.ID]; t != "uuid" {
		return fmt.Errorf("%w: the id column %s of table %s is %s; the relay needs a uuid (the message id and the key of its marks)",
			ErrMisconfigured, r.cols.ID, r.cfg.Table, t)
	}
	if types["published_at"] == "" {
		return fmt.Errorf("%w: table %s has no published_at column, which the relay keeps (unpublished rows are published_at IS NULL, in both RELAY_ON_PUBLISHED modes): "+
			"run %s; adding it does not rewrite the table", ErrMisconfigured, r.cfg.Table, migrate)
	}
	if types["relay_seq"] == "" {
		return fmt.Errorf("%w: table %s has no relay_seq column, which orders the table sweep: "+
			"run %s (migration 004 adds it without rewriting the table)", ErrMisconfigured, r.cfg.Table, migrate)
	}
	r.optional = map[string]bool{}
	for _, c := range []string{r.cols.Traceparent, r.cols.Tracestate, r.cols.TracingSpanContext} {
		if c != "" && types[c] != "" {
			r.optional[c] = true
		}
	}
	return nil
}

// checkWritePrivilege fails before anything is published when the role
// cannot do what the marker does to a confirmed row: publishing events whose
// rows it then cannot mark or delete would only publish them again at every
// restart.
func (r *Relay) checkWritePrivilege(ctx context.Context) error {
	var ok bool
	var role string
	q := `SELECT has_column_privilege($1::regclass, 'published_at', 'UPDATE'), current_user`
	what := "UPDATE (published_at)"
	if r.deleting() {
		q = `SELECT has_table_privilege($1::regclass, 'DELETE'), current_user`
		what = "DELETE"
	}
	if err := r.opt.Pool.QueryRow(ctx, q, r.tableIdent).Scan(&ok, &role); err != nil {
		return classifyPg(fmt.Errorf("check privileges on %s: %w", r.cfg.Table, err))
	}
	if !ok {
		return fmt.Errorf("%w: RELAY_ON_PUBLISHED=%s needs %s on %s, which role %q lacks: "+
			"GRANT %s ON %s TO %s (deploy/least-privilege.sql)",
			ErrMisconfigured, r.cfg.OnPublished, what, r.cfg.Table, role, what, r.tableIdent, pgx.Identifier{role}.Sanitize())
	}
	return nil
}

// deleting reports RELAY_ON_PUBLISHED=delete: a confirmed event's row is
// deleted instead of marked.
func (r *Relay) deleting() bool { return r.cfg.OnPublished == config.OnPublishedDelete }

// dropSlot drops the relay's slot (lost, or its sweep never finished).
func (r *Relay) dropSlot(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	_, err := r.opt.Pool.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, r.cfg.Slot)
	if err != nil {
		return classifyPg(fmt.Errorf("drop slot %q: %w", r.cfg.Slot, err))
	}
	return nil
}

// classifyPg marks errors that retrying cannot fix as misconfiguration.
func classifyPg(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case pgerrcode.InvalidPassword, pgerrcode.InvalidAuthorizationSpecification, // no pg_hba entry or role
			pgerrcode.InvalidCatalogName, // the database does not exist
			pgerrcode.InsufficientPrivilege:
			return fmt.Errorf("%w: %w", ErrMisconfigured, err)
		}
	}
	return databaseFailure(err)
}

// sweepPending reports whether the slot's table sweep never finished.
func (r *Relay) sweepPending(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	var pending bool
	err := r.opt.Pool.QueryRow(ctx, `SELECT sweep_pending FROM `+r.stateTable(slotStateTable)+` WHERE slot_name = $1`,
		r.cfg.Slot).Scan(&pending)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, classifyPg(fmt.Errorf("read outbox_relay_slot_state (run `outbox-relay migrate`): %w", err))
	}
	return pending, nil
}

// setSweepPending records whether the slot's table sweep is outstanding.
func (r *Relay) setSweepPending(ctx context.Context, pending bool) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	// A new slot (the sweep is pending before it is created) starts a new
	// stream: delete mode's deleted_through of the last one, perhaps of
	// another cluster whose state was restored here, means nothing to it.
	_, err := r.opt.Pool.Exec(ctx, `INSERT INTO `+r.stateTable(slotStateTable)+` AS s (slot_name, sweep_pending) VALUES ($1, $2)
		ON CONFLICT (slot_name) DO UPDATE SET sweep_pending = excluded.sweep_pending, updated_at = now(),
			deleted_through = CASE WHEN excluded.sweep_pending THEN NULL ELSE s.deleted_through END,
			deleted_through_event = CASE WHEN excluded.sweep_pending THEN NULL ELSE s.deleted_through_event END`,
		r.cfg.Slot, pending)
	if err != nil {
		return classifyPg(fmt.Errorf("write outbox_relay_slot_state (run `outbox-relay migrate`): %w", err))
	}
	return nil
}

// The relay's own tables, created by `outbox-relay migrate` in the first
// schema of its search_path at the time.
const (
	slotStateTable = "outbox_relay_slot_state" // migration 003
	confirmedTable = "outbox_relay_confirmed"  // migration 005
)

// stateTable is the relay's table name, qualified with the schema
// findStateTables found it in.
func (r *Relay) stateTable(name string) string {
	if schema := r.stateSchemas[name]; schema != "" {
		return pgx.Identifier{schema, name}.Sanitize()
	}
	return name // not looked up (a test of one stage): the search_path's
}

// findStateTables finds the schema of each of the relay's own tables. The
// search_path is the one setting the relay inherits from a role or a
// database (it cannot know the schemas an operator uses), and a DBA may set
// one that leaves out where migrate created the tables, e.g. after the
// migration, or for the applications' sake. So a table on the search_path
// is taken from there, as before; otherwise the one in the outbox table's
// schema, or the only one there is. The relay's queries then name the
// schema, and only a table that exists nowhere, or in several schemas none
// of which is on the search_path, is an error, which says so.
func (r *Relay) findStateTables(ctx context.Context) error {
	rows, err := r.opt.Pool.Query(ctx, `SELECT t.name,
			(SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
				WHERE c.oid = to_regclass(quote_ident(t.name))),
			ARRAY(SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
				WHERE c.relname = t.name AND c.relkind IN ('r', 'p') ORDER BY n.nspname),
			current_setting('search_path')
		FROM unnest($1::text[]) AS t(name)`, []string{slotStateTable, confirmedTable})
	if err != nil {
		return classifyPg(fmt.Errorf("find the relay's tables: %w", err))
	}
	defer rows.Close()
	found := make(map[string]string, 2)
	for rows.Next() {
		var name, searchPath string
		var visible *string
		var everywhere []string
		if err := rows.Scan(&name, &visible, &everywhere, &searchPath); err != nil {
			return classifyPg(fmt.Errorf("find the relay's tables: %w", err))
		}
		schema, err := r.pickStateSchema(name, visible, everywhere, searchPath)
		if err != nil {
			return err
		}
		found[name] = schema
	}
	if err := rows.Err(); err != nil {
		return classifyPg(fmt.Errorf("find the relay's tables: %w", err))
	}
	r.stateSchemas = found
	var hasThrough bool
	err = r.opt.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_attribute
		WHERE attrelid = $1::regclass AND attname = 'deleted_through' AND NOT attisdropped)`, r.stateTable(slotStateTable)).Scan(&hasThrough)
	if err != nil {
		return classifyPg(fmt.Errorf("check %s: %w", slotStateTable, err))
	}
	if !hasThrough {
		return fmt.Errorf("%w: table %s has no deleted_through column, which the replay check reads: "+
			"run `outbox-relay migrate` (migration 007)", ErrMisconfigured, slotStateTable)
	}
	return nil
}

func (r *Relay) pickStateSchema(name string, visible *string, everywhere []string, searchPath string) (string, error) {
	if visible != nil {
		return *visible, nil
	}
	for _, s := range everywhere {
		if s == r.schema {
			return s, nil
		}
	}
	switch len(everywhere) {
	case 1:
		return everywhere[0], nil
	case 0:
		migration := "003"
		if name == confirmedTable {
			migration = "005"
		}
		return "", fmt.Errorf("%w: table %s does not exist: run `outbox-relay migrate` (migration %s)",
			ErrMisconfigured, name, migration)
	}
	return "", fmt.Errorf("%w: table %s is in schemas %s, none of them on the relay's search_path (%s) nor the schema "+
		"of RELAY_TABLE: a role or database default (ALTER ROLE/DATABASE … SET search_path) leaves it out; "+
		"add the right schema to it", ErrMisconfigured, name, strings.Join(everywhere, ", "), searchPath)
}
