// Package migrations holds the relay's versioned SQL, embedded in the binary,
// and applies it. Files are named NNN_name.sql and applied in order, each in
// its own transaction, under an advisory lock so that two relays starting at
// once do not race. The applied versions are recorded per outbox table in
// outbox_relay_migrations, so running migrate again changes nothing.
//
// A file NNN_name.<layout>.sql replaces NNN_name.sql for that table layout
// (`migrate --layout debezium`): the same version, another way to reach it.
//
// The SQL is a template: {{table}}, {{unpublished_index}}, {{publication}},
// {{relay_seq_index}}, {{relay_seq_sequence}} and {{relay_seq_function}} are quoted identifiers and
// {{publication_literal}}, {{table_literal}} and {{relay_seq_sequence_literal}} quoted literals
// ({{existing_published_at}} is now() or NULL, Target.PublishExisting), so
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

// Table layouts migrate can create (Target.Layout).
const (
	LayoutDefault  = "default"
	LayoutDebezium = "debezium"
	// LayoutExisting adopts a table of the application's own layout: it
	// must exist, and only the relay's columns are added.
	LayoutExisting = "existing"
)

// Target names the objects the migrations create.
type Target struct {
	Schema, Table string
	Publication   string
	// Layout is LayoutDefault ("" too), LayoutDebezium or LayoutExisting.
	Layout string
	// PublishExisting: with LayoutDebezium or LayoutExisting, rows already in an existing
	// table are left unpublished for the relay's first sweep, instead of
	// counting as published (delivered by Debezium).
	PublishExisting bool
}

// All returns the embedded migrations of the default layout in version
// order.
func All() ([]Migration, error) { return ForLayout(LayoutDefault) }

// ForLayout returns the embedded migrations of a layout in version order.
func ForLayout(layout string) ([]Migration, error) {
	if layout == "" {
		layout = LayoutDefault
	}
	if layout != LayoutDefault && layout != LayoutDebezium && layout != LayoutExisting {
		return nil, fmt.Errorf("unknown table layout %q (known: %s, %s, %s)", layout, LayoutDefault, LayoutDebezium, LayoutExisting)
	}
	entries, err := fs.Glob(files, "*.sql")
	if err != nil {
		return nil, err
	}
	byVersion := map[int]Migration{}
	for _, name := range entries {
		num, _, ok := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %s: name must start with a version number", name)
		}
		base := strings.TrimSuffix(name, ".sql")
		fileLayout := LayoutDefault
		if stem, l, ok := strings.Cut(base, "."); ok {
			base, fileLayout = stem, l
		}
		if fileLayout != layout && fileLayout != LayoutDefault {
			continue // another layout's
		}
		if _, dup := byVersion[v]; dup && fileLayout == LayoutDefault {
			continue // this layout has its own
		}
		b, err := files.ReadFile(name)
		if err != nil {
			return nil, err
		}
		byVersion[v] = Migration{Version: v, Name: base, SQL: string(b)}
	}
	var ms []Migration
	for _, m := range byVersion {
		ms = append(ms, m)
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
	existing := "now()"
	if t.PublishExisting {
		existing = "NULL"
	}
	r := strings.NewReplacer(
		"{{table}}", pgx.Identifier{t.Schema, t.Table}.Sanitize(),
		"{{table_literal}}", QuoteLiteral(pgx.Identifier{t.Schema, t.Table}.Sanitize()),
		"{{existing_published_at}}", existing,
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
	ms, err := ForLayout(t.Layout)
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
