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
			rollback(tx)
			return nil, classifyPg(fmt.Errorf("table sweep: %s: %w", q, err))
		}
	}
	return tx, nil
}

// sweepQueries read the unpublished rows in insert order (relay_seq), the
// order the stream delivers them in within a transaction and across
// transactions that write one aggregate under a lock. Rows written before
// migration 004 have no relay_seq and come first, in occurred_at, id order:
// two cursors, one after the other, so that each is served by its own
// partial index (a single ORDER BY relay_seq NULLS FIRST, occurred_at, id
// would sort the whole pre-004 backlog before the first row, within one
// statement's timeout).
// Rows whose broker confirmation is recorded in outbox_relay_confirmed (the
// relay was a synchronous standby and acknowledged them before they were
// visible) are not published again: the marker completes their marks.
// Every value is read as text and turned into an event by the decoder's
// rules, so a row the stream would dead-letter (occurred_at = infinity, a
// NULL) is dead-lettered here too instead of failing the scan.
func (r *Relay) sweepQueries() []string {
	q := func(where, order string) string {
		return `DECLARE outbox_relay_sweep NO SCROLL CURSOR FOR
		SELECT id::text, aggregate_type::text, aggregate_id::text, event_type::text, payload::text, occurred_at::text
		FROM ` + r.tableIdent + ` AS t WHERE published_at IS NULL AND ` + where + `
			AND NOT EXISTS (SELECT 1 FROM ` + r.stateTable(confirmedTable) + ` c
				WHERE c.slot_name = ` + migrations.QuoteLiteral(r.cfg.Slot) + ` AND c.id = t.id)
		ORDER BY ` + order
	}
	return []string{
		// Qualified: a bare name in ORDER BY means the output column of
		// that name, here the text of the timestamp and of the id.
		q("t.relay_seq IS NULL", "t.occurred_at, t.id"),
		q("t.relay_seq IS NOT NULL", "t.relay_seq"),
	}
}

// sweep feeds the unpublished rows of the snapshot into the pipeline with a
// cursor, so that a backlog of millions of rows takes bounded memory.
func (s *session) sweep(soft, ctx context.Context, tx pgx.Tx) error {
	defer rollback(tx)
	r := s.r
	ctr := s.tracker.Begin()
	closed := false
	defer func() {
		if !closed {
			s.tracker.Close(ctr, 0)
		}
	}()
	total := 0
	lastLog := time.Now()
	pages := sweepPager{}
	r.m.SetReady(false, "sweeping table "+r.cfg.Table+": publishing the unpublished rows the new slot will never deliver")
	for _, q := range r.sweepQueries() {
		if err := s.sweepExec(ctx, tx, q); err != nil {
			return err
		}
		for soft.Err() == nil {
			n, largest, err := s.sweepPage(ctx, tx, ctr, pages.next())
			if err != nil {
				return err
			}
			pages.saw(n, largest)
			total += n
			r.m.SweptEvents.Add(float64(n))
			if n == 0 {
				break
			}
			if time.Since(lastLog) > 5*time.Second {
				lastLog = time.Now()
				s.log.Info().Int("rows", total).Msg("table sweep in progress")
				r.m.SetReady(false, fmt.Sprintf("sweeping table %s: %d rows published so far", r.cfg.Table, total))
			}
		}
		if err := s.sweepExec(ctx, tx, `CLOSE outbox_relay_sweep`); err != nil {
			return err
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

// rollback ends a read-only transaction, bounded: a database that stopped
// answering must not hold a stop for as long as TCP retries.
func rollback(tx pgx.Tx) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = tx.Rollback(ctx)
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

// Pages of the sweep are read in full before their rows enter the
// pipeline (and its byte budget), so their size is bounded in bytes too
// (payloads and text fields): the first page is small, each next one at
// most twice the last, and no page is planned above sweepPageBytes at the
// largest row seen so far. Measured: a first page of 1,000 rows held
// 194 MiB of 1 MB payloads while the broker confirmed nothing, against
// RELAY_MAX_INFLIGHT_BYTES = 8 MiB.
const (
	firstSweepPage = 4
	maxSweepPage   = 1000
	sweepPageBytes = 4 << 20
	// sweepWorkMem holds a page in the server's memory: a page that doubled
	// on rows grown larger is about twice sweepPageBytes.
	sweepWorkMem = 4 * sweepPageBytes
)

type sweepPager struct {
	size    int
	largest int // bytes of the largest row seen (eventBytes)
}

func (p *sweepPager) next() int {
	if p.size == 0 {
		p.size = firstSweepPage
	}
	return p.size
}

// saw records a page of n rows whose largest row had largest bytes.
func (p *sweepPager) saw(n, largest int) {
	p.largest = max(p.largest, largest)
	size := min(maxSweepPage, 2*p.next())
	if p.largest > 0 {
		size = min(size, max(1, sweepPageBytes/p.largest))
	}
	p.size = size
}

// sweepPage fetches up to fetch rows and hands them to the pipeline. The
// rows are read in full before the first is handed on: the FETCH is bounded
// by RELAY_POSTGRES_TIMEOUT, the wait for room in the pipeline is not.
func (s *session) sweepPage(ctx context.Context, tx pgx.Tx, ctr *checkpoint.Tx, fetch int) (n, largest int, err error) {
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
		largest = max(largest, int(eventBytes(&ev)))
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
	return len(page), largest, nil
}
