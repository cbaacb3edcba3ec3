// Package migrations holds the relay's versioned SQL, embedded in the binary,
// and applies it. Files are named NNN_name.sql and applied in order, each in
// its own transaction, under an advisory lock so that two relays starting at
// once do not race. The applied versions are recorded per outbox table in
// outbox_relay_migrations, so running migrate again changes nothing.
//
// The SQL is a template: {{table}}, {{unpublished_index}}, {{publication}},
// {{relay_seq_index}}, {{relay_seq_sequence}} and {{relay_seq_function}} are quoted identifiers and
// {{publication_literal}} and {{relay_seq_sequence_literal}} quoted literals, so
// RELAY_TABLE and RELAY_PUBLICATION never reach SQL unquoted.
package migrations

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/pgquote"
)

//go:embed *.sql
var files embed.FS

// Migration is one versioned file.
type Migration struct {
	Version int
	Name    string
	SQL     string
}

// Target names the objects the migrations create.
type Target struct {
	Schema, Table string
	Publication   string
}

// All returns the embedded migrations in version order.
func All() ([]Migration, error) {
	entries, err := fs.Glob(files, "*.sql")
	if err != nil {
		return nil, err
	}
	var ms []Migration
	for _, name := range entries {
		num, _, ok := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %s: name must start with a version number", name)
		}
		b, err := files.ReadFile(name)
		if err != nil {
			return nil, err
		}
		ms = append(ms, Migration{Version: v, Name: strings.TrimSuffix(name, ".sql"), SQL: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].Version < ms[j].Version })
	return ms, nil
}

// Render fills the template for t.
func (m Migration) Render(t Target) string {
	name := func(suffix string) string {
		n := t.Table + suffix
		if len(n) > 63 {
			n = n[:63]
		}
		return n
	}
	// Names that keep their suffix whole, so that they stay distinct
	// however long the table's name is (a sequence and an index cannot
	// share one), cut at a character boundary.
	suffixed := func(suffix string) string {
		base := t.Table
		for len(base)+len(suffix) > 63 {
			_, size := utf8.DecodeLastRuneInString(base)
			base = base[:len(base)-size]
		}
		return base + suffix
	}
	seq := pgx.Identifier{t.Schema, suffixed("_relay_seq_seq")}.Sanitize()
	r := strings.NewReplacer(
		"{{table}}", pgx.Identifier{t.Schema, t.Table}.Sanitize(),
		"{{unpublished_index}}", pgx.Identifier{name("_unpublished_idx")}.Sanitize(),
		"{{relay_seq_index}}", pgx.Identifier{suffixed("_relay_seq_idx")}.Sanitize(),
		"{{relay_seq_function}}", pgx.Identifier{t.Schema, suffixed("_relay_seq_next")}.Sanitize(),
		"{{relay_seq_sequence}}", seq,
		"{{relay_seq_sequence_literal}}", QuoteLiteral(seq),
		"{{publication}}", pgx.Identifier{t.Publication}.Sanitize(),
		"{{publication_literal}}", QuoteLiteral(t.Publication),
	)
	return r.Replace(m.SQL)
}

// QuoteLiteral quotes s as an SQL string literal (pgquote.Literal).
func QuoteLiteral(s string) string { return pgquote.Literal(s) }

// Result says what Apply did.
type Result struct {
	Applied []string // names of migrations applied now
	Current int      // highest version applied
}

// Apply runs every migration not yet recorded for t.
func Apply(ctx context.Context, conn *pgx.Conn, t Target) (Result, error) {
	var res Result
	ms, err := All()
	if err != nil {
		return res, err
	}
	const ddl = `CREATE TABLE IF NOT EXISTS outbox_relay_migrations (
		outbox_table text NOT NULL,
		version      int  NOT NULL,
		name         text NOT NULL,
		applied_at   timestamptz NOT NULL DEFAULT now(),
		PRIMARY KEY (outbox_table, version))`
	key := t.Schema + "." + t.Table
	for _, m := range ms {
		applied, err := applyOne(ctx, conn, ddl, key, m, t)
		if err != nil {
			return res, fmt.Errorf("migration %s: %w", m.Name, err)
		}
		if applied {
			res.Applied = append(res.Applied, m.Name)
		}
		res.Current = m.Version
	}
	return res, nil
}

func applyOne(ctx context.Context, conn *pgx.Conn, ddl, key string, m Migration, t Target) (bool, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit this is a no-op
	// One lock for every relay's migrations: schema changes are rare and short.
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(7340211)`); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, ddl); err != nil {
		return false, err
	}
	var done bool
	err = tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM outbox_relay_migrations WHERE outbox_table = $1 AND version = $2)`,
		key, m.Version).Scan(&done)
	if err != nil || done {
		return false, err
	}
	if _, err := tx.Exec(ctx, m.Render(t)); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO outbox_relay_migrations (outbox_table, version, name) VALUES ($1, $2, $3)`,
		key, m.Version, m.Name); err != nil {
		return false, err
	}
	return true, tx.Commit(ctx)
}
