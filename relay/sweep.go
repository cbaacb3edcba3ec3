package relay

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/checkpoint"
	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/pgquote"
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
func (r *Relay) beginSweep(ctx context.Context, snapshot string) (sweepCursor, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.PostgresTimeout)
	defer cancel()
	tx, err := r.opt.Pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, classifyPg(fmt.Errorf("begin table sweep: %w", err))
	}
	for _, q := range []string{
		`SET TRANSACTION SNAPSHOT ` + pgquote.Literal(snapshot),
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
	return &pgSweep{r: r, tx: tx, queries: r.sweepQueries()}, nil
}

// sweepOrder is one of the sweep's cursors: the rows whose relay_seq is
// NULL or not (seqNull), sorted by the columns named. The simulator's
// store sorts by the same names.
type sweepOrder struct {
	seqNull bool
	by      []string
}

// sweepOrders read the unpublished rows in insert order (relay_seq), the
// order the stream delivers them in within a transaction and across
// transactions that write one aggregate under a lock. Rows written before
// migration 004 have no relay_seq and come first, in occurred_at, id order:
// two cursors, one after the other, so that each is served by its own
// partial index (a single ORDER BY relay_seq NULLS FIRST, occurred_at, id
// would sort the whole pre-004 backlog before the first row, within one
// statement's timeout).
var sweepOrders = []sweepOrder{
	{seqNull: true, by: []string{"occurred_at", "id"}},
	{seqNull: false, by: []string{"relay_seq"}},
}

// sweepQueries are sweepOrders in SQL.
// Rows whose broker confirmation is recorded in outbox_relay_confirmed (the
// relay was a synchronous standby and acknowledged them before they were
// visible) are not published again: the marker completes their marks.
// Every value is read as text and turned into an event by the decoder's
// rules, so a row the stream would dead-letter (occurred_at = infinity, a
// NULL) is dead-lettered here too instead of failing the scan.
func (r *Relay) sweepQueries() []string {
	var out []string
	for _, o := range sweepOrders {
		where := "t.relay_seq IS NOT NULL"
		if o.seqNull {
			where = "t.relay_seq IS NULL"
		}
		// Qualified: a bare name in ORDER BY means the output column of
		// that name, here the text of the timestamp and of the id.
		var by []string
		for _, f := range o.by {
			if c := r.sweepColumn(f); c != "" {
				by = append(by, "t."+pgx.Identifier{c}.Sanitize())
			}
		}
		out = append(out, `DECLARE outbox_relay_sweep NO SCROLL CURSOR FOR
		SELECT `+strings.Join(r.sweepSelect(), ", ")+`
		FROM `+r.tableIdent+` AS t WHERE published_at IS NULL AND `+where+`
			AND NOT EXISTS (SELECT 1 FROM `+r.stateTable(confirmedTable)+` c
				WHERE c.slot_name = `+pgquote.Literal(r.cfg.Slot)+` AND c.id = t.`+r.idCol+`)
		ORDER BY `+strings.Join(by, ", "))
	}
	return out
}

// sweepColumn is the table's column for a name of sweepOrders: the
// mapped column of a field, "" when the layout has none.
func (r *Relay) sweepColumn(field string) string {
	if field == "relay_seq" {
		return field
	}
	return r.cols.Column(field)
}

// sweepSelect is the sweep's select list, in decoder.Row's order. Without
// an occurred_at column a row's time is the sweep's (the stream's is the
// commit time, which the table does not keep); the optional trace columns
// are read when preflight found them.
func (r *Relay) sweepSelect() []string {
	col := func(name string) string { return "t." + pgx.Identifier{name}.Sanitize() + "::text" }
	c := r.cols
	sel := []string{col(c.ID), col(c.AggregateType), col(c.AggregateID), col(c.EventType), col(c.Payload)}
	if c.OccurredAt != "" {
		sel = append(sel, col(c.OccurredAt))
	} else {
		sel = append(sel, "now()::text")
	}
	for _, name := range []string{c.Traceparent, c.Tracestate, c.TracingSpanContext} {
		if name != "" && r.optional[name] {
			sel = append(sel, col(name))
		} else {
			sel = append(sel, "NULL::text")
		}
	}
	for _, h := range c.Headers {
		sel = append(sel, col(h))
	}
	return sel
}

// pgSweep is the sweep's transaction and its cursors, one after the other.
type pgSweep struct {
	r        *Relay
	tx       pgx.Tx
	queries  []string
	declared bool
}

func (p *pgSweep) next(ctx context.Context, n int) ([]decoder.Row, error) {
	for len(p.queries) > 0 {
		if !p.declared {
			if err := p.exec(ctx, p.queries[0]); err != nil {
				return nil, err
			}
			p.declared = true
		}
		rows, err := p.fetch(ctx, n)
		if err != nil || len(rows) > 0 {
			return rows, err
		}
		if err := p.exec(ctx, `CLOSE outbox_relay_sweep`); err != nil {
			return nil, err
		}
		p.declared = false
		p.queries = p.queries[1:]
	}
	return nil, nil
}

func (p *pgSweep) close() { rollback(p.tx) }

// exec runs one statement of the sweep under RELAY_POSTGRES_TIMEOUT.
func (p *pgSweep) exec(ctx context.Context, q string) error {
	qctx, cancel := context.WithTimeout(ctx, p.r.cfg.PostgresTimeout)
	defer cancel()
	if _, err := p.tx.Exec(qctx, q); err != nil {
		return classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	return nil
}

// fetch reads up to n rows of the open cursor, in full, under
// RELAY_POSTGRES_TIMEOUT.
func (p *pgSweep) fetch(ctx context.Context, n int) ([]decoder.Row, error) {
	qctx, cancel := context.WithTimeout(ctx, p.r.cfg.PostgresTimeout)
	defer cancel()
	rows, err := p.tx.Query(qctx, `FETCH `+strconv.Itoa(n)+` FROM outbox_relay_sweep`)
	if err != nil {
		return nil, classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	defer rows.Close()
	page := make([]decoder.Row, 0, n)
	for rows.Next() {
		var row decoder.Row
		dest := []any{&row.ID, &row.AggregateType, &row.AggregateID, &row.EventType, &row.Payload, &row.OccurredAt,
			&row.Traceparent, &row.Tracestate, &row.SpanContext}
		if n := len(p.r.cols.Headers); n > 0 {
			row.Headers = make([]*string, n)
			for i := range row.Headers {
				dest = append(dest, &row.Headers[i])
			}
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, classifyPg(fmt.Errorf("table sweep: %w", err))
		}
		page = append(page, row)
	}
	if err := rows.Err(); err != nil {
		return nil, classifyPg(fmt.Errorf("table sweep: %w", err))
	}
	return page, nil
}

// sweep feeds the unpublished rows of the snapshot into the pipeline,
// a page at a time, so that a backlog of millions of rows takes bounded
// memory.
func (s *session) sweep(st stops, cur sweepCursor) error {
	soft, hard := st.soft, st.hard
	defer cur.close()
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
	for soft.Err() == nil {
		n, largest, err := s.sweepPage(hard, cur, ctr, pages.next())
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		pages.saw(n, largest)
		total += n
		r.m.SweptEvents.Add(float64(n))
		if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			s.log.Info().Int("rows", total).Msg("table sweep in progress")
			r.m.SetReady(false, fmt.Sprintf("sweeping table %s: %d rows published so far", r.cfg.Table, total))
		}
	}
	if soft.Err() != nil {
		return nil // interrupted: the sweep stays pending and runs again on a new slot
	}
	closed = true
	s.tracker.Close(ctr, 0)
	// The sweep is finished only when every swept row is confirmed and
	// marked; a halted session (a failed mark) finishes none of them.
	for s.tracker.InFlight() > 0 {
		t := time.NewTimer(10 * time.Millisecond)
		select {
		case <-t.C:
		case <-s.halted:
			t.Stop()
			return s.haltErr
		case <-hard.Done():
			t.Stop()
			return hard.Err()
		}
	}
	if err := r.db.setSweepPending(hard, false); err != nil {
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
func (s *session) sweepPage(ctx context.Context, cur sweepCursor, ctr *checkpoint.Tx, fetch int) (n, largest int, err error) {
	rows, err := cur.next(ctx, fetch)
	if err != nil {
		return 0, 0, err
	}
	page := make([]decoder.Event, len(rows))
	for i := range rows {
		page[i] = s.r.layout.EventFromRow(rows[i])
		largest = max(largest, int(eventBytes(&page[i])))
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
