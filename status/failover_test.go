package status

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// fakePrimary answers the failover queries as a server of version num
// whose slot has failover slotFailover (nil: no such slot).
type fakePrimary struct {
	t            *testing.T
	version      string
	num          int
	slotFailover *bool
	queries      int
}

type fakeRow struct {
	vals []any
	err  error
}

func (r fakeRow) Scan(dest ...any) error {
	if r.err != nil {
		return r.err
	}
	if len(dest) != len(r.vals) {
		return fmt.Errorf("scan %d values into %d", len(r.vals), len(dest))
	}
	for i, v := range r.vals {
		switch d := dest[i].(type) {
		case *string:
			*d = v.(string)
		case *int:
			*d = v.(int)
		case *bool:
			*d = v.(bool)
		default:
			return fmt.Errorf("cannot scan into %T", d)
		}
	}
	return nil
}

func (p *fakePrimary) QueryRow(_ context.Context, sql string, args ...any) pgx.Row {
	p.queries++
	switch {
	case strings.Contains(sql, "server_version_num"):
		return fakeRow{vals: []any{p.version, p.num}}
	case strings.Contains(sql, "SELECT failover FROM pg_replication_slots"):
		if p.num < 170000 {
			p.t.Errorf("pg_replication_slots.failover read on server %d, which has no such column", p.num)
		}
		if p.slotFailover == nil {
			return fakeRow{err: pgx.ErrNoRows}
		}
		return fakeRow{vals: []any{*p.slotFailover}}
	}
	p.t.Errorf("unexpected query %s", sql)
	return fakeRow{err: fmt.Errorf("unexpected query")}
}

func ptr[T any](v T) *T { return &v }

const multiHost = "postgres://u@h1:5441,h2:5442,h3:5443/db?target_session_attrs=read-write"

// standbys is a hostReader: h1 is the primary, h2 a standby with a synced
// copy, h3 one with an unsynced copy. It records the hosts it was asked.
func standbys(t *testing.T, asked *[]string) hostReader {
	return func(_ context.Context, h *pgx.ConnConfig, slot string) (bool, StandbyCopy, error) {
		if h.ValidateConnect != nil || len(h.Fallbacks) > 0 {
			t.Errorf("host %s read with target_session_attrs' check or fallbacks: the standbys would be refused", h.Host)
		}
		*asked = append(*asked, hostPort(h))
		switch h.Host {
		case "h2":
			return true, StandbyCopy{HasCopy: true, Synced: true}, nil
		case "h3":
			return true, StandbyCopy{HasCopy: true, Synced: false}, nil
		}
		return false, StandbyCopy{}, nil
	}
}

func TestFailoverVersionGate(t *testing.T) {
	for _, tc := range []struct {
		version string
		num     int
		slot    *bool
		summary string
		asked   []string
	}{
		{"15.20", 150020, ptr(false), "not supported on server version 15.20 (failover slots need PostgreSQL 17)", nil},
		{"16.4", 160004, ptr(false), "not supported on server version 16.4 (failover slots need PostgreSQL 17)", nil},
		{"17.2", 170002, nil, "on; the slot does not exist yet", nil},
		{"17.2", 170002, ptr(false), "on, but the slot is not a failover slot yet", nil},
		{"17.2", 170002, ptr(true), "on; standby h2:5442 synced, standby h3:5443 NOT synced",
			[]string{"h1:5441", "h2:5442", "h3:5443"}},
		{"18.0", 180000, ptr(true), "on; standby h2:5442 synced, standby h3:5443 NOT synced",
			[]string{"h1:5441", "h2:5442", "h3:5443"}},
	} {
		p := &fakePrimary{t: t, version: tc.version, num: tc.num, slotFailover: tc.slot}
		var asked []string
		f, err := readFailover(t.Context(), p, multiHost, "outbox_relay", true, standbys(t, &asked))
		if err != nil {
			t.Fatalf("%s: %v", tc.version, err)
		}
		if got := f.Summary(); !strings.HasPrefix(got, tc.summary) {
			t.Errorf("server %s, slot failover %v: %q, want %q…", tc.version, tc.slot, got, tc.summary)
		}
		if !slices.Equal(asked, tc.asked) {
			t.Errorf("server %s, slot failover %v: hosts read %q, want %q", tc.version, tc.slot, asked, tc.asked)
		}
	}
}

func TestFailoverOffReadsNothing(t *testing.T) {
	p := &fakePrimary{t: t, version: "17.2", num: 170002, slotFailover: ptr(true)}
	var asked []string
	f, err := readFailover(t.Context(), p, multiHost, "outbox_relay", false, standbys(t, &asked))
	if err != nil {
		t.Fatal(err)
	}
	if f.Summary() != "off" || p.queries != 0 || len(asked) != 0 {
		t.Errorf("off: %q after %d queries and hosts %q, want \"off\" and nothing read", f.Summary(), p.queries, asked)
	}
}

// A single-host URL names no standby; its one host is not connected to.
func TestFailoverSingleHost(t *testing.T) {
	p := &fakePrimary{t: t, version: "17.2", num: 170002, slotFailover: ptr(true)}
	var asked []string
	f, err := readFailover(t.Context(), p, "postgres://u@h1:5441/db", "outbox_relay", true, standbys(t, &asked))
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Summary(); !strings.Contains(got, "no standby among RELAY_DATABASE_URL's hosts") || len(asked) != 0 {
		t.Errorf("single host: %q, hosts read %q", got, asked)
	}
}

// TestFailoverOn15 is the status row against the real server, PostgreSQL 15.
func TestFailoverOn15(t *testing.T) {
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	slot := testenv.Slot(t, dbURL)
	pool, err := pgxpool.New(t.Context(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(t.Context(), `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot); err != nil {
		t.Fatal(err)
	}
	var major int
	if err := pool.QueryRow(t.Context(), `SELECT current_setting('server_version_num')::int / 10000`).Scan(&major); err != nil {
		t.Fatal(err)
	}
	if major != 15 {
		t.Fatalf("server is PostgreSQL %d: this test knows what 15 shows", major)
	}

	off, err := ReadFailover(t.Context(), pool, dbURL, slot, false)
	if err != nil || off.Summary() != "off" {
		t.Fatalf("off: %v %v, want \"off\"", off, err)
	}
	f, err := ReadFailover(t.Context(), pool, dbURL, slot, true)
	if err != nil {
		t.Fatal(err)
	}
	if f.Supported || f.SlotFailover != nil || !strings.HasPrefix(f.ServerVersion, "15.") {
		t.Errorf("on 15: %+v, want unsupported, no failover column read, version 15.x", f)
	}
	want := "not supported on server version " + f.ServerVersion + " (failover slots need PostgreSQL 17)"
	if !strings.HasPrefix(f.Summary(), want) {
		t.Errorf("on 15: %q, want %q…", f.Summary(), want)
	}
	var text bytes.Buffer
	rep := &Report{Failover: f}
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^failover slot +` + regexp.QuoteMeta(want)).MatchString(text.String()) {
		t.Errorf("status text has no failover slot row %q:\n%s", want, text.String())
	}
}

// TestReadHostDropsTargetSessionAttrs reads each host of a multi-host URL
// that asks for a standby: the real server, a primary, is still read (the
// URL's check is dropped) and found not in recovery.
func TestReadHostDropsTargetSessionAttrs(t *testing.T) {
	testenv.Integration(t)
	dbURL := testenv.Postgres(t)
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		t.Fatalf("test database URL %s has no port", u.Redacted())
	}
	u.Host = u.Host + ",localhost:" + u.Port()
	q := u.Query()
	q.Set("target_session_attrs", "standby")
	u.RawQuery = q.Encode()
	hosts, err := hostConfigs(u.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts) != 2 {
		t.Fatalf("hosts of %s: %d, want 2", u.Redacted(), len(hosts))
	}
	for _, h := range hosts {
		standby, _, err := readHost(t.Context(), h, "x")
		if err != nil || standby {
			t.Errorf("host %s: standby=%v err=%v, want the primary read, not in recovery", hostPort(h), standby, err)
		}
	}
}
