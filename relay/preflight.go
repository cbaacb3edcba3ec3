package relay

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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
	var hasSeq, hasState, hasConfirmed bool
	err = r.opt.Pool.QueryRow(ctx, `SELECT
		EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1::regclass AND attname = 'relay_seq' AND NOT attisdropped),
		to_regclass('outbox_relay_slot_state') IS NOT NULL,
		to_regclass('outbox_relay_confirmed') IS NOT NULL`, r.tableIdent).Scan(&hasSeq, &hasState, &hasConfirmed)
	if err != nil {
		return si, classifyPg(fmt.Errorf("check table %s: %w", r.cfg.Table, err))
	}
	if !hasSeq {
		return si, fmt.Errorf("%w: table %s has no relay_seq column, which orders the table sweep: "+
			"run `outbox-relay migrate` (migration 004 adds it without rewriting the table)", ErrMisconfigured, r.cfg.Table)
	}
	if !hasState {
		return si, fmt.Errorf("%w: table outbox_relay_slot_state does not exist (or is not on the search_path): "+
			"run `outbox-relay migrate` (migration 003)", ErrMisconfigured)
	}
	if !hasConfirmed {
		return si, fmt.Errorf("%w: table outbox_relay_confirmed does not exist (or is not on the search_path): "+
			"run `outbox-relay migrate` (migration 005)",
			ErrMisconfigured)
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
		case "28P01", "28000", // bad password, no pg_hba entry / role
			"3D000", // database does not exist
			"42501": // insufficient privilege
			return fmt.Errorf("%w: %w", ErrMisconfigured, err)
		}
	}
	return fmt.Errorf("%w: %w", errDatabase, err)
}

// sweepPending reports whether the slot's table sweep never finished.
func (r *Relay) sweepPending(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	var pending bool
	err := r.opt.Pool.QueryRow(ctx, `SELECT sweep_pending FROM outbox_relay_slot_state WHERE slot_name = $1`,
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
	_, err := r.opt.Pool.Exec(ctx, `INSERT INTO outbox_relay_slot_state (slot_name, sweep_pending) VALUES ($1, $2)
		ON CONFLICT (slot_name) DO UPDATE SET sweep_pending = excluded.sweep_pending, updated_at = now()`,
		r.cfg.Slot, pending)
	if err != nil {
		return classifyPg(fmt.Errorf("write outbox_relay_slot_state (run `outbox-relay migrate`): %w", err))
	}
	return nil
}
