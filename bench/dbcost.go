package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// dbCost is the database's side of one drain (issue 13): the WAL the
// producer's inserts wrote and the WAL the design's own writes (marks or
// deletes) wrote, the CPU of every PostgreSQL process over each, and the
// dead tuples left in outbox_events. The phases run one after the other
// (the relay is stopped while the backlog is inserted), so each share is
// measured alone.
type dbCost struct {
	WALInsertBytes   float64 `json:"wal_insert_bytes_per_event"`
	WALOwnBytes      float64 `json:"wal_own_bytes_per_event"`
	OwnToInsert      float64 `json:"own_wal_to_insert_wal"`
	CPUInsertMs      float64 `json:"pg_cpu_insert_ms_per_1000_events"`
	CPUOwnMs         float64 `json:"pg_cpu_drain_ms_per_1000_events"`
	DeadTuplesPer1k  float64 `json:"dead_tuples_left_per_1000_events"`
	ProcsInCPUSample int     `json:"postgres_processes_sampled"`
}

// costPoint is one reading of the counters dbCost is made of.
type costPoint struct {
	lsn   string
	cpu   time.Duration
	procs int
	dead  int64
}

// postgresCPU sums utime+stime over every process named postgres (the
// postmaster, backends, walsenders, walwriter, checkpointer, autovacuum),
// plus the postmaster's cutime+cstime: the CPU of backends that have
// exited, which the postmaster reaped.
func postgresCPU() (time.Duration, int, error) {
	dirs, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return 0, 0, err
	}
	type proc struct {
		ppid                         int
		utime, stime, cutime, cstime int64
	}
	procs := map[int]proc{}
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // exited meanwhile
		}
		s := string(b)
		open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || close < open || s[open+1:close] != "postgres" {
			continue
		}
		f := strings.Fields(s[close+1:])
		// After the comm: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
		if len(f) < 15 {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		var pr proc
		pr.ppid, _ = strconv.Atoi(f[1])
		pr.utime, _ = strconv.ParseInt(f[11], 10, 64)
		pr.stime, _ = strconv.ParseInt(f[12], 10, 64)
		pr.cutime, _ = strconv.ParseInt(f[13], 10, 64)
		pr.cstime, _ = strconv.ParseInt(f[14], 10, 64)
		procs[pid] = pr
	}
	if len(procs) == 0 {
		return 0, 0, fmt.Errorf("no postgres process in /proc: is PostgreSQL on this machine?")
	}
	var ticks int64
	for _, pr := range procs {
		ticks += pr.utime + pr.stime
		if _, child := procs[pr.ppid]; !child {
			ticks += pr.cutime + pr.cstime // a postmaster
		}
	}
	return time.Duration(ticks) * time.Second / clockTicks, len(procs), nil
}

// readCost reads the WAL position, the PostgreSQL CPU and the dead tuples
// of outbox_events (pgstattuple, exact; -1 when the extension is missing).
func (b *bench) readCost(ctx context.Context) (costPoint, error) {
	var p costPoint
	if err := b.admin.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&p.lsn); err != nil {
		return p, fmt.Errorf("read WAL position: %w", err)
	}
	var err error
	if p.cpu, p.procs, err = postgresCPU(); err != nil {
		return p, err
	}
	p.dead = -1
	if b.pgstattuple {
		if err := b.pool.QueryRow(ctx, `SELECT dead_tuple_count FROM pgstattuple('outbox_events')`).Scan(&p.dead); err != nil {
			return p, fmt.Errorf("pgstattuple: %w", err)
		}
	}
	return p, nil
}

func (b *bench) walDiff(ctx context.Context, from, to string) (float64, error) {
	var d float64
	err := b.admin.QueryRow(ctx, `SELECT pg_wal_lsn_diff($2::pg_lsn, $1::pg_lsn)::float8`, from, to).Scan(&d)
	return d, err
}

// cost turns three readings (before the inserts, after them, after the
// drain) into per-event figures.
func (b *bench) cost(ctx context.Context, n int, before, inserted, drained costPoint) (dbCost, error) {
	ins, err := b.walDiff(ctx, before.lsn, inserted.lsn)
	if err != nil {
		return dbCost{}, err
	}
	own, err := b.walDiff(ctx, inserted.lsn, drained.lsn)
	if err != nil {
		return dbCost{}, err
	}
	c := dbCost{
		WALInsertBytes:   ins / float64(n),
		WALOwnBytes:      own / float64(n),
		CPUInsertMs:      float64((inserted.cpu - before.cpu).Microseconds()) / float64(n),
		CPUOwnMs:         float64((drained.cpu - inserted.cpu).Microseconds()) / float64(n),
		DeadTuplesPer1k:  -1,
		ProcsInCPUSample: drained.procs,
	}
	if c.WALInsertBytes > 0 {
		c.OwnToInsert = c.WALOwnBytes / c.WALInsertBytes
	}
	if drained.dead >= 0 && inserted.dead >= 0 {
		c.DeadTuplesPer1k = float64(drained.dead-inserted.dead) / float64(n) * 1000
	}
	return c, nil
}

// prepareCost installs pgstattuple in the bench's database when it can and
// turns autovacuum off for outbox_events, so that the dead tuples counted
// are the ones each design leaves, not what a vacuum happened to remove.
func (b *bench) prepareCost(ctx context.Context) error {
	if _, err := b.pool.Exec(ctx, `ALTER TABLE outbox_events SET (autovacuum_enabled = false)`); err != nil {
		return fmt.Errorf("turn autovacuum off for outbox_events: %w", err)
	}
	if _, err := b.pool.Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pgstattuple`); err != nil {
		logf("pgstattuple is not available (%v): dead tuples are not counted", err)
		return nil
	}
	b.pgstattuple = true
	return nil
}

func logCost(name string, c dbCost) {
	logf("%s: database: WAL %.0f B/event for the inserts, %.0f B/event of its own (%.0f%%); PostgreSQL CPU %.1f ms per 1,000 inserted, %.1f ms per 1,000 drained; dead tuples left %.0f per 1,000",
		name, c.WALInsertBytes, c.WALOwnBytes, 100*c.OwnToInsert, c.CPUInsertMs, c.CPUOwnMs, c.DeadTuplesPer1k)
}
