package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// withDatabase returns the admin URL pointed at another database.
func withDatabase(adminURL, db string) (string, error) {
	if strings.Contains(adminURL, "://") {
		u, err := url.Parse(adminURL)
		if err != nil {
			return "", errors.New("-database-url is not a valid URL")
		}
		u.Path = "/" + db
		return u.String(), nil
	}
	return adminURL + " dbname=" + db, nil
}

func connect(ctx context.Context, dsn, app string) (*pgx.Conn, error) {
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("not a valid PostgreSQL connection string")
	}
	cc.RuntimeParams["application_name"] = app
	return pgx.ConnectConfig(ctx, cc)
}

func newPool(ctx context.Context, dsn, app string, max int32) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("not a valid PostgreSQL connection string")
	}
	pc.MaxConns = max
	pc.ConnConfig.RuntimeParams["application_name"] = app
	return pgxpool.NewWithConfig(ctx, pc)
}

// dropBenchDatabase drops the run's slot first (a database with a slot
// cannot be dropped), then the database itself.
func dropBenchDatabase(ctx context.Context, admin *pgx.Conn, db, slot string) error {
	var errs []error
	for i := 0; i < 50; i++ {
		var active bool
		var pid *int32
		err := admin.QueryRow(ctx, `SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active, &pid)
		if errors.Is(err, pgx.ErrNoRows) {
			break
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("read slot %s: %w", slot, err))
			break
		}
		if active && pid != nil {
			_, _ = admin.Exec(ctx, `SELECT pg_terminate_backend($1)`, *pid)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if _, err := admin.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot); err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "55006" { // in use: retry
				time.Sleep(100 * time.Millisecond)
				continue
			}
			errs = append(errs, fmt.Errorf("drop slot %s: %w", slot, err))
		}
		break
	}
	if _, err := admin.Exec(ctx, `DROP DATABASE IF EXISTS `+pgx.Identifier{db}.Sanitize()+` WITH (FORCE)`); err != nil {
		errs = append(errs, fmt.Errorf("drop database %s: %w", db, err))
	}
	return errors.Join(errs...)
}

// insertBacklog writes rows seq 0..n-1 of a phase server-side, txRows rows
// per transaction, in sequence order, so commit order is sequence order.
// synchronous_commit is off for the loader only: it changes how fast the
// backlog is written, not what the WAL stream contains.
func insertBacklog(ctx context.Context, dsn string, tag uint32, phase, n, txRows, padLen int, progress func(done int)) error {
	conn, err := connect(ctx, dsn, "outbox-relay-bench loader")
	if err != nil {
		return fmt.Errorf("loader: %w", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `SET synchronous_commit = off`); err != nil {
		return fmt.Errorf("loader: %w", err)
	}
	prefix := fmt.Sprintf("%08x-%04x-4000-8000-", tag, phase)
	const chunk = 10000
	next := time.Now().Add(2 * time.Second)
	for from := 0; from < n; from += chunk {
		to := min(from+chunk, n) - 1
		// Only integers and hex go into this text; no configuration does.
		q := fmt.Sprintf(`DO $bench$
DECLARE i bigint;
BEGIN
  FOR i IN %d..%d LOOP
    INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, occurred_at)
    VALUES (('%s' || lpad(to_hex(i), 12, '0'))::uuid, 'bench', gen_random_uuid(), 'Created',
            jsonb_build_object('seq', i, 'pad', repeat('x', %d)), clock_timestamp());
    IF (i + 1) %% %d = 0 OR i = %d THEN COMMIT; END IF;
  END LOOP;
END
$bench$`, from, to, prefix, padLen, txRows, n-1)
		if _, err := conn.Exec(ctx, q); err != nil {
			return fmt.Errorf("loader: insert rows %d..%d: %w", from, to, err)
		}
		if progress != nil && (time.Now().After(next) || to == n-1) {
			progress(to + 1)
			next = time.Now().Add(2 * time.Second)
		}
	}
	return nil
}

func payloadJSON(pad string, seq int64) string {
	// jsonb's own text form, so the body is byte for byte what the relay sends.
	return fmt.Sprintf(`{"pad": "%s", "seq": %d}`, pad, seq)
}

// loadResult describes one steady-load phase as it was really offered.
type loadResult struct {
	Committed int64   `json:"committed"`
	Seconds   float64 `json:"seconds"`
	Achieved  float64 `json:"achieved_events_per_s"`
	Behind    int64   `json:"transactions_started_late_over_10ms"`
}

// runLoad offers rate events/s for dur from producers connections, txRows
// events per transaction, recording in t the time each COMMIT returned.
// Sequence numbers are (k*producers + p) so that each producer's events form
// one ordered stream for the reorder check.
func runLoad(ctx context.Context, dsn string, t *tracker, tag uint32, phase int, rate float64, txRows, producers int, dur time.Duration, padLen int, progress func(committed int64)) (loadResult, error) {
	pad := strings.Repeat("x", padLen)
	conns := make([]*pgx.Conn, producers)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close(context.Background())
			}
		}
	}()
	for p := range conns {
		c, err := connect(ctx, dsn, "outbox-relay-bench producer")
		if err != nil {
			return loadResult{}, fmt.Errorf("producer: %w", err)
		}
		conns[p] = c
	}
	const one = `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		VALUES ($1::text::uuid, 'bench', $2::text::uuid, 'Created', $3::text::jsonb)`
	const many = `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT u.id::uuid, 'bench', u.agg::uuid, 'Created', u.p::jsonb
		FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(id, agg, p, o) ORDER BY u.o`
	interval := time.Duration(float64(time.Second) * float64(txRows*producers) / rate)
	var committed, behind atomic.Int64
	var lastCommit atomic.Int64
	start := time.Now().Add(50 * time.Millisecond)
	end := start.Add(dur)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, producers)
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			conn := conns[p]
			offset := interval * time.Duration(p) / time.Duration(producers)
			ids := make([]string, txRows)
			aggs := make([]string, txRows)
			bodies := make([]string, txRows)
			seqs := make([]int64, txRows)
			k := int64(0)
			for j := 0; ; j++ {
				at := start.Add(offset + time.Duration(j)*interval)
				if !at.Before(end) {
					return
				}
				if d := time.Until(at); d > 0 {
					select {
					case <-time.After(d):
					case <-ctx.Done():
						return
					}
				} else if d < -10*time.Millisecond {
					behind.Add(1)
				}
				for i := 0; i < txRows; i++ {
					seq := k*int64(producers) + int64(p)
					k++
					if seq >= int64(len(t.commit)) {
						errc <- errors.New("producer: sequence space exhausted (bug in the bench)")
						cancel()
						return
					}
					seqs[i] = seq
					ids[i] = eventID(tag, phase, seq)
					aggs[i] = fmt.Sprintf("%08x-0000-4000-8000-%012x", tag, p)
					bodies[i] = payloadJSON(pad, seq)
				}
				var err error
				if txRows == 1 {
					_, err = conn.Exec(ctx, one, ids[0], aggs[0], bodies[0])
				} else {
					_, err = conn.Exec(ctx, many, ids, aggs, bodies)
				}
				if err != nil {
					if ctx.Err() == nil {
						errc <- fmt.Errorf("producer %d: %w", p, err)
						cancel()
					}
					return
				}
				now := nowNs()
				for _, s := range seqs[:txRows] {
					atomic.StoreInt64(&t.commit[s], now)
				}
				committed.Add(int64(txRows))
				lastCommit.Store(now)
			}
		}(p)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
loop:
	for {
		select {
		case <-done:
			break loop
		case <-tick.C:
			if progress != nil {
				progress(committed.Load())
			}
		}
	}
	select {
	case err := <-errc:
		return loadResult{}, err
	default:
	}
	if ctx.Err() != nil {
		return loadResult{}, ctx.Err()
	}
	secs := time.Duration(lastCommit.Load() - int64(start.Sub(base))).Seconds()
	r := loadResult{Committed: committed.Load(), Seconds: secs, Behind: behind.Load()}
	if secs > 0 {
		r.Achieved = float64(r.Committed) / secs
	}
	return r, nil
}

// countUnpublished counts rows not yet marked (the partial index makes it
// cheap).
func countUnpublished(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	var n int64
	err := pool.QueryRow(ctx, `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&n)
	return n, err
}

// waitMarked polls until every row is marked, failing if the count stops
// falling for stall.
func waitMarked(ctx context.Context, pool *pgxpool.Pool, stall time.Duration, progress func(left int64)) error {
	last := int64(-1)
	lastChange := time.Now()
	next := time.Now().Add(2 * time.Second)
	for {
		n, err := countUnpublished(ctx, pool)
		if err != nil {
			return fmt.Errorf("count unpublished rows: %w", err)
		}
		if n == 0 {
			return nil
		}
		if n != last {
			last, lastChange = n, time.Now()
		}
		if time.Since(lastChange) > stall {
			return fmt.Errorf("LOSS: %d rows still have published_at IS NULL after %s without progress", n, stall)
		}
		if progress != nil && time.Now().After(next) {
			progress(n)
			next = time.Now().Add(2 * time.Second)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// describeMissing reports what the table says about events the consumer
// never received: not marked (the relay never got to them) or marked
// (published, or so it believed, and lost on the way).
func describeMissing(ctx context.Context, pool *pgxpool.Pool, tag uint32, phase int, seqs []int64) string {
	var b strings.Builder
	for _, s := range seqs {
		id := eventID(tag, phase, s)
		var published *time.Time
		err := pool.QueryRow(ctx, `SELECT published_at FROM outbox_events WHERE id = $1::text::uuid`, id).Scan(&published)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			fmt.Fprintf(&b, "  %s: not in the table\n", id)
		case err != nil:
			fmt.Fprintf(&b, "  %s: %v\n", id, err)
		case published == nil:
			fmt.Fprintf(&b, "  %s: not marked published\n", id)
		default:
			fmt.Fprintf(&b, "  %s: MARKED published at %s but never received\n", id, published.Format(time.RFC3339Nano))
		}
	}
	return b.String()
}
