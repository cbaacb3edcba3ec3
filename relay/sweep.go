package relay

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// beginSweep opens a read-only transaction on the slot's exported snapshot.
// Rows visible in it never come through the slot, so the unpublished ones
// among them must be published from the table (invariant 7).
//
// The transaction sets its own limits: each statement is bounded by
// RELAY_POSTGRES_TIMEOUT, but idling between FETCHes is not, since the
// cursor waits on the pipeline, for as long as the broker takes. That
// holds no more back than the sweep has to: the walsender that exported the
// snapshot holds the same xmin horizon until START_REPLICATION. Timestamps
// come out as pgoutput sends them, in ISO form and UTC.
//
// work_mem is the relay's too: PostgreSQL holds each FETCH's rows in a
// tuplestore of work_mem before it sends them, and spills the rest to a
// temporary file. Under a database's work_mem = '64kB' and temp_file_limit
// = '64kB' every FETCH of 1,000 small rows failed (SQLSTATE 53400), the
// sweep was redone on a new slot, and failed again, forever.
func (r *Relay) beginSweep(ctx context.Context, snapshot string) (pgx.Tx, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	tx, err := r.opt.Pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, classifyPg(fmt.Errorf("begin table sweep: %w", err))
	}
	for _, q := range []string{
		`SET TRANSACTION SNAPSHOT ` + migrations.QuoteLiteral(snapshot),
		`SET LOCAL idle_in_transaction_session_timeout = 0`,
		`SET LOCAL TimeZone = 'UTC'`,
		`SET LOCAL DateStyle = 'ISO, YMD'`,
		`SET LOCAL work_mem = '` + strconv.Itoa(sweepWorkMem>>10) + `kB'`,
	} {
		if _, err := tx.Exec(ctx, q); err != nil {
			_ = tx.Rollback(context.Background())
			return nil, classifyPg(fmt.Errorf("table sweep: %s: %w", q, err))
		}
	}
	return tx, nil
}

// sweepQuery reads the unpublished rows in insert order (relay_seq), the
// order the stream delivers them in within a transaction and across
// transactions that write one aggregate under a lock. Rows written before
// migration 004 have no relay_seq and come first, in occurred_at, id order.
// Rows whose broker confirmation is recorded in outbox_relay_confirmed (the
// relay was a synchronous standby and acknowledged them before they were
// visible) are not published again: the marker completes their marks.
// Every value is read as text and turned into an event by the decoder's
// rules, so a row the stream would dead-letter (occurred_at = infinity, a
// NULL) is dead-lettered here too instead of failing the scan.
func (r *Relay) sweepQuery() string {
	return `DECLARE outbox_relay_sweep NO SCROLL CURSOR FOR
		SELECT id::text, aggregate_type::text, aggregate_id::text, event_type::text, payload::text, occurred_at::text
		FROM ` + r.tableIdent + ` AS t WHERE published_at IS NULL
			AND NOT EXISTS (SELECT 1 FROM ` + r.stateTable(confirmedTable) + ` c
				WHERE c.slot_name = ` + migrations.QuoteLiteral(r.cfg.Slot) + ` AND c.id = t.id)
		ORDER BY relay_seq NULLS FIRST, occurred_at, id`
}

// sweep feeds the unpublished rows of the snapshot into the pipeline with a
// cursor, so that a backlog of millions of rows takes bounded memory.
func (s *session) sweep(soft, ctx context.Context, tx pgx.Tx) error {
	defer tx.Rollback(context.Background()) //nolint:errcheck // read-only
	r := s.r
	if err := s.sweepExec(ctx, tx, r.sweepQuery()); err != nil {
		return err
	}
	ctr := s.tracker.Begin()
	closed := false
	defer func() {
		if !closed {
			s.tracker.Close(ctr, 0)
		}
	}()
	total := 0
	lastLog := time.Now()
	fetch := 1 // nothing is known of the rows' size yet
	for soft.Err() == nil {
		n, bytes, err := s.sweepPage(ctx, tx, ctr, fetch)
		if err != nil {
			return err
		}
		fetch = nextSweepPage(fetch, n, bytes)
		total += n
		r.m.SweptEvents.Add(float64(n))
		if n == 0 {
			break
		}
		if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			s.log.Info().Int("rows", total).Msg("table sweep in progress")
		}
	}
	if soft.Err() != nil {
		return nil // interrupted: the sweep stays pending and runs again on a new slot
	}
	closed = true
	s.tracker.Close(ctr, 0)
	// The sweep is finished only when every swept row is confirmed and marked.
	for s.tracker.InFlight() > 0 {
		if !sleep(ctx, 10*time.Millisecond) {
			return ctx.Err()
		}
	}
	if err := r.setSweepPending(ctx, false); err != nil {
		return err
	}
	s.log.Warn().Int("rows", total).Msg("table sweep done: published the unpublished rows the slot will never deliver")
	return nil
}

// sweepExec runs one statement of the sweep under RELAY_POSTGRES_TIMEOUT.
func (s *session) sweepExec(ctx context.Context, tx pgx.Tx, q string) error {
	qctx, cancel := context.WithTimeout(ctx, s.r.cfg.PostgresTimeout)
	defer cancel()
	if _, err := tx.Exec(qctx, q); err != nil {
		return classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	return nil
}

// Pages of the sweep: up to maxSweepPage rows, fewer when rows are large,
// so that one page holds about sweepPageBytes (payloads and text fields).
// A page is read whole before its first row is handed on, so its size is
// what the rows read so far predict: the first page is one row, and a page
// at most doubles the last, so that rows growing larger part way (small
// rows, then 1 MB ones) fill at most twice the rows the small ones allowed.
// Measured: a first page of 1,000 rows held 194 MiB of 1 MB payloads while
// the broker confirmed nothing, against RELAY_MAX_INFLIGHT_BYTES = 8 MiB.
const (
	maxSweepPage   = 1000
	sweepPageBytes = 4 << 20
	// sweepWorkMem holds a page in the server's memory: a page that doubled
	// (nextSweepPage) on rows grown larger is about twice sweepPageBytes.
	sweepWorkMem = 4 * sweepPageBytes
)

// nextSweepPage sizes the next FETCH from the last page's bytes.
func nextSweepPage(fetched, n, bytes int) int {
	limit := min(maxSweepPage, 2*fetched)
	if n == 0 || bytes == 0 {
		return limit
	}
	return max(1, min(limit, sweepPageBytes*n/bytes))
}

// sweepPage fetches up to fetch rows and hands them to the pipeline. The
// rows are read in full before the first is handed on: the FETCH is bounded
// by RELAY_POSTGRES_TIMEOUT, the wait for room in the pipeline is not.
func (s *session) sweepPage(ctx context.Context, tx pgx.Tx, ctr *checkpoint.Tx, fetch int) (n, bytes int, err error) {
	qctx, cancel := context.WithTimeout(ctx, s.r.cfg.PostgresTimeout)
	rows, err := tx.Query(qctx, `FETCH `+strconv.Itoa(fetch)+` FROM outbox_relay_sweep`)
	if err != nil {
		cancel()
		return 0, 0, classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	page := make([]decoder.Event, 0, fetch)
	for rows.Next() {
		var row decoder.Row
		if err := rows.Scan(&row.ID, &row.AggregateType, &row.AggregateID, &row.EventType, &row.Payload, &row.OccurredAt); err != nil {
			rows.Close()
			cancel()
			return 0, 0, classifyPg(fmt.Errorf("table sweep: %w", err))
		}
		ev := decoder.EventFromRow(row)
		bytes += int(eventBytes(&ev))
		page = append(page, ev)
	}
	rows.Close()
	cancel()
	if err := rows.Err(); err != nil {
		return 0, 0, classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	for i := range page {
		s.tracker.Add(ctr)
		// Not streaming yet: no status to send while the pipeline is full.
		if err := s.send(ctx, &item{tx: ctr, sweep: true, ev: page[i]}, nil); err != nil {
			return 0, 0, err
		}
		page[i] = decoder.Event{} // the pipeline has it now
	}
	return len(page), bytes, nil
}
