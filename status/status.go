// Package status gathers what an operator asks first: is the slot healthy,
// how much WAL does it hold, how many rows wait, and how old is the oldest.
package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Slot is the relay's replication slot.
type Slot struct {
	Name              string  `json:"name"`
	Exists            bool    `json:"exists"`
	Active            bool    `json:"active"`
	ActivePID         *int32  `json:"active_pid"`
	ConfirmedFlushLSN *string `json:"confirmed_flush_lsn"`
	RestartLSN        *string `json:"restart_lsn"`
	WALRetainedBytes  *int64  `json:"wal_retained_bytes"`
	WALStatus         *string `json:"wal_status"`
	// SafeWALBytes is how much more WAL can be written before the slot is
	// lost to max_slot_wal_keep_size; nil when no limit is set.
	SafeWALBytes *int64 `json:"safe_wal_size_bytes"`
}

// Sync is the relay's walsender as a synchronous standby: when
// synchronous_standby_names matches it ('*', or its application_name),
// commits can wait for the relay.
type Sync struct {
	// State is pg_stat_replication.sync_state of the walsender streaming
	// the slot (async, potential, sync, quorum); null when the slot is not
	// active or the role cannot read it (it needs pg_monitor).
	State                   *string `json:"sync_state"`
	SynchronousStandbyNames string  `json:"synchronous_standby_names"`
	// SyncPublish is RELAY_SYNC_PUBLISH: the relay is listed on purpose.
	SyncPublish bool `json:"sync_publish"`
	// ConfirmedUnmarked counts events the broker confirmed whose rows were
	// not visible yet to mark (outbox_relay_confirmed); null before
	// migration 005.
	ConfirmedUnmarked *int64 `json:"confirmed_unmarked_rows"`
}

// Report is the status of one relay's slot, publication and table.
type Report struct {
	Slot               Slot     `json:"slot"`
	Sync               Sync     `json:"sync"`
	Publication        string   `json:"publication"`
	PublicationExists  bool     `json:"publication_exists"`
	Table              string   `json:"table"`
	Unpublished        int64    `json:"unpublished_rows"`
	OldestUnpublishedS *float64 `json:"oldest_unpublished_age_seconds"`
	CurrentWALLSN      string   `json:"current_wal_lsn"`
	// SlotCreationWaitsFor lists, while the slot is being created (it
	// exists with no confirmed position yet), the transactions its creation
	// waits for.
	SlotCreationWaitsFor []Blocker `json:"slot_creation_waits_for,omitempty"`
	// Failover is the failover slot (RELAY_FAILOVER_SLOT), set by the
	// caller from ReadFailover; informational, never a problem.
	Failover *Failover `json:"failover_slot,omitempty"`
	Problems []string  `json:"problems"`
}

// Gather reads the report. stuckAfter > 0 flags an oldest unpublished row
// older than that as a problem. syncPublish is RELAY_SYNC_PUBLISH: without
// it, a relay that is a synchronous standby candidate is a problem; with
// it, one that is not.
func Gather(ctx context.Context, pool *pgxpool.Pool, slot, publication, schema, table, timeCol string, stuckAfter time.Duration,
	syncPublish bool) (*Report, error) {
	rep := &Report{Slot: Slot{Name: slot}, Publication: publication, Table: schema + "." + table, Problems: []string{},
		Sync: Sync{SyncPublish: syncPublish}}
	err := pool.QueryRow(ctx, `SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text,
			pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status, safe_wal_size
		FROM pg_replication_slots WHERE slot_name = $1`, slot).
		Scan(&rep.Slot.Active, &rep.Slot.ActivePID, &rep.Slot.ConfirmedFlushLSN, &rep.Slot.RestartLSN,
			&rep.Slot.WALRetainedBytes, &rep.Slot.WALStatus, &rep.Slot.SafeWALBytes)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		rep.Problems = append(rep.Problems, fmt.Sprintf("slot %q does not exist (the relay creates it on start)", slot))
	case err != nil:
		return nil, fmt.Errorf("read pg_replication_slots: %w", err)
	default:
		rep.Slot.Exists = true
		if rep.Slot.ConfirmedFlushLSN == nil {
			var walsender uint32
			if rep.Slot.ActivePID != nil {
				walsender = uint32(*rep.Slot.ActivePID)
			}
			bs, err := Blockers(ctx, pool, walsender)
			if err != nil {
				return nil, err
			}
			rep.SlotCreationWaitsFor = bs
			rep.Problems = append(rep.Problems, fmt.Sprintf("slot %q is being created, %s", slot, DescribeBlockers(bs)))
		}
		if rep.Slot.WALStatus != nil && *rep.Slot.WALStatus == "unreserved" {
			safe := "-"
			if rep.Slot.SafeWALBytes != nil {
				safe = humanBytes(*rep.Slot.SafeWALBytes)
			}
			rep.Problems = append(rep.Problems, fmt.Sprintf("slot %q is past max_slot_wal_keep_size (wal_status unreserved, "+
				"safe_wal_size %s): it is lost at the next checkpoint unless the relay catches up", slot, safe))
		}
		if rep.Slot.WALStatus != nil && *rep.Slot.WALStatus == "lost" {
			rep.Problems = append(rep.Problems, fmt.Sprintf("slot %q is lost: its WAL was removed; the relay will recreate it and sweep the table", slot))
		}
	}
	if err := pool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text, EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`,
		publication).Scan(&rep.CurrentWALLSN, &rep.PublicationExists); err != nil {
		return nil, fmt.Errorf("read publication: %w", err)
	}
	if !rep.PublicationExists {
		rep.Problems = append(rep.Problems, fmt.Sprintf("publication %q does not exist (run `outbox-relay migrate`)", publication))
	}
	q := `SELECT count(*), ` + oldestExpr(timeCol) + ` FROM ` +
		pgx.Identifier{schema, table}.Sanitize() + ` WHERE published_at IS NULL`
	if err := pool.QueryRow(ctx, q).Scan(&rep.Unpublished, &rep.OldestUnpublishedS); err != nil {
		return nil, fmt.Errorf("count unpublished rows in %s: %w", rep.Table, err)
	}
	if stuckAfter > 0 && rep.OldestUnpublishedS != nil && *rep.OldestUnpublishedS > stuckAfter.Seconds() {
		rep.Problems = append(rep.Problems, fmt.Sprintf("the oldest unpublished row is %.0fs old (threshold %s)",
			*rep.OldestUnpublishedS, stuckAfter))
	}
	if err := rep.gatherSync(ctx, pool, schema); err != nil {
		return nil, err
	}
	return rep, nil
}

// oldestExpr is the age in seconds of the oldest unpublished row by its
// time column, or NULL when the table has none (RELAY_COLUMNS without
// occurred_at: the event time is the commit time, which the table does not
// keep).
func oldestExpr(timeCol string) string {
	if timeCol == "" {
		return "NULL::float8"
	}
	return "extract(epoch FROM now() - min(" + pgx.Identifier{timeCol}.Sanitize() + "))::float8"
}

// gatherSync reads the slot's walsender's sync_state and the records of
// confirmed, not yet marked events.
func (rep *Report) gatherSync(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	sy := &rep.Sync
	// The records' table as the relay finds it (relay/preflight.go,
	// findStateTables): on the search_path, else in the outbox table's
	// schema, else wherever it is; a search_path without its schema does
	// not hide it.
	var confirmedSchema *string
	err := pool.QueryRow(ctx, `SELECT
			(SELECT r.sync_state FROM pg_stat_replication r
				JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1),
			current_setting('synchronous_standby_names'),
			(SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
				WHERE c.relname = 'outbox_relay_confirmed' AND c.relkind IN ('r', 'p')
				ORDER BY c.oid = to_regclass('outbox_relay_confirmed') DESC NULLS LAST, n.nspname = $2 DESC, n.nspname
				LIMIT 1)`, rep.Slot.Name, schema).
		Scan(&sy.State, &sy.SynchronousStandbyNames, &confirmedSchema)
	if err != nil {
		return fmt.Errorf("read pg_stat_replication: %w", err)
	}
	if confirmedSchema != nil {
		var n int64
		table := pgx.Identifier{*confirmedSchema, "outbox_relay_confirmed"}.Sanitize()
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+table+` WHERE slot_name = $1`,
			rep.Slot.Name).Scan(&n); err != nil {
			return fmt.Errorf("count outbox_relay_confirmed: %w", err)
		}
		sy.ConfirmedUnmarked = &n
	}
	candidate := false
	if sy.State != nil {
		switch *sy.State {
		case "sync", "quorum", "potential":
			candidate = true
		}
	}
	switch {
	case candidate && !sy.SyncPublish:
		rep.Problems = append(rep.Problems, fmt.Sprintf("the relay's walsender is a synchronous standby candidate "+
			"(sync_state %s, synchronous_standby_names = %q): commits can wait for the relay; name the physical standbys "+
			"instead of '*', e.g. 'FIRST 1 (standby_name)', or set RELAY_SYNC_PUBLISH=true if this is meant",
			*sy.State, sy.SynchronousStandbyNames))
	case sy.SyncPublish && sy.State != nil && !candidate:
		rep.Problems = append(rep.Problems, fmt.Sprintf("RELAY_SYNC_PUBLISH is set but the relay's walsender is %s "+
			"(synchronous_standby_names = %q): commits do not wait for the broker", *sy.State, sy.SynchronousStandbyNames))
	}
	return nil
}

// WriteJSON writes the report for machines.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText writes the report for people.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	str := func(p *string) string {
		if p == nil {
			return "-"
		}
		return *p
	}
	fmt.Fprintf(tw, "slot\t%s\n", r.Slot.Name)
	if r.Slot.Exists {
		active := "no"
		if r.Slot.Active && r.Slot.ActivePID != nil {
			active = fmt.Sprintf("yes (pid %d)", *r.Slot.ActivePID)
		}
		fmt.Fprintf(tw, "  active\t%s\n", active)
		fmt.Fprintf(tw, "  confirmed_flush_lsn\t%s\n", str(r.Slot.ConfirmedFlushLSN))
		retained := "-"
		if r.Slot.WALRetainedBytes != nil {
			retained = humanBytes(*r.Slot.WALRetainedBytes)
		}
		fmt.Fprintf(tw, "  wal retained\t%s\n", retained)
		fmt.Fprintf(tw, "  wal_status\t%s\n", str(r.Slot.WALStatus))
		safe := "no limit (max_slot_wal_keep_size = -1)"
		if r.Slot.SafeWALBytes != nil {
			safe = humanBytes(*r.Slot.SafeWALBytes)
		}
		fmt.Fprintf(tw, "  safe_wal_size\t%s\n", safe)
		for _, b := range r.SlotCreationWaitsFor {
			fmt.Fprintf(tw, "  creation waits for\t%s\n", b)
		}
	} else {
		fmt.Fprintf(tw, "  exists\tno\n")
	}
	pub := "missing"
	if r.PublicationExists {
		pub = "ok"
	}
	fmt.Fprintf(tw, "publication\t%s (%s)\n", r.Publication, pub)
	fmt.Fprintf(tw, "table\t%s\n", r.Table)
	fmt.Fprintf(tw, "  unpublished rows\t%d\n", r.Unpublished)
	oldest := "-"
	if r.OldestUnpublishedS != nil {
		oldest = (time.Duration(*r.OldestUnpublishedS * float64(time.Second))).Round(time.Millisecond).String()
	}
	fmt.Fprintf(tw, "  oldest unpublished\t%s\n", oldest)
	fmt.Fprintf(tw, "current wal lsn\t%s\n", r.CurrentWALLSN)
	syncState := "-"
	switch {
	case r.Sync.State != nil && r.Sync.SyncPublish:
		syncState = *r.Sync.State + " (RELAY_SYNC_PUBLISH)"
	case r.Sync.State != nil:
		syncState = *r.Sync.State
	}
	fmt.Fprintf(tw, "synchronous standby\t%s (synchronous_standby_names = %q)\n", syncState, r.Sync.SynchronousStandbyNames)
	if r.Sync.ConfirmedUnmarked != nil {
		fmt.Fprintf(tw, "  confirmed, not yet marked\t%d\n", *r.Sync.ConfirmedUnmarked)
	}
	if r.Failover != nil {
		fmt.Fprintf(tw, "failover slot\t%s\n", r.Failover.Summary())
	}
	for _, p := range r.Problems {
		fmt.Fprintf(tw, "PROBLEM\t%s\n", p)
	}
	return tw.Flush()
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
