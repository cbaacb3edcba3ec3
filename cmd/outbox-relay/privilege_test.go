package main

// The relay, status and prune under the least-privilege role that
// deploy/least-privilege.sql creates: the script itself is rendered (its
// psql variables filled in) and run, so the documented SQL is what is
// tested.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

func TestLeastPrivilegeRole(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t) // as the owner (postgres), as documented
	admin := e.conn(t)
	ctx := t.Context()

	role := testenv.Name(t, "role")
	password := lpRandomHex(t)
	u, err := url.Parse(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	script := lpRenderScript(t, map[string]string{
		"relay_role": role, "relay_password": password, "DBNAME": strings.TrimPrefix(u.Path, "/"),
		"outbox_schema": "public", "outbox_table": "outbox_events", "state_schema": "public",
		"retention": "false", // run needs no DELETE; granted below for prune
	})
	// Roles are cluster-wide: drop this one even if the test fails. DROP
	// OWNED revokes its grants here (the database is dropped later anyway).
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, e.dbURL)
		if err != nil {
			t.Errorf("cleanup of role %s: %v", role, err)
			return
		}
		defer conn.Close(context.Background())
		if _, err := conn.Exec(ctx, "DROP OWNED BY "+pgx.Identifier{role}.Sanitize()+"; DROP ROLE "+pgx.Identifier{role}.Sanitize()); err != nil {
			t.Errorf("cleanup of role %s: %v", role, err)
		}
	})
	if _, err := admin.Exec(ctx, script); err != nil {
		t.Fatalf("deploy/least-privilege.sql: %v\n%s", err, script)
	}
	var super, repl bool
	if err := admin.QueryRow(ctx, `SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = $1`, role).Scan(&super, &repl); err != nil {
		t.Fatal(err)
	}
	if super || !repl {
		t.Fatalf("role %s: superuser=%v replication=%v, want false, true", role, super, repl)
	}

	ru := *u
	ru.User = url.UserPassword(role, password)
	roleURL := ru.String()
	vars := with(e.vars(), "RELAY_DATABASE_URL", roleURL,
		"RELAY_STATUS_POLL_INTERVAL", "200ms", // its query runs as the role too
		"RELAY_HEARTBEAT_INTERVAL", "300ms")

	// The relay streams, publishes and marks rows as the role.
	c := newConsumer(t, e.amqpURL, e.exchange)
	p := start(t, vars, "run")
	const n = 25
	ids := make([]string, 0, n)
	rows, err := admin.Query(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'order', gen_random_uuid(), 'created', jsonb_build_object('n', g)
		FROM generate_series(1, $1) g RETURNING id::text`, n)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if !eventually(60*time.Second, func() bool {
		for _, id := range ids {
			if !c.received(id) {
				return false
			}
		}
		return true
	}) {
		distinct, _, _ := c.snapshot()
		t.Fatalf("under the least-privilege role, %d of %d events arrived within 60s; relay output:\n%s", distinct, n, p.all.String())
	}
	var unmarked int
	if !eventually(30*time.Second, func() bool {
		return admin.QueryRow(ctx, `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&unmarked) == nil && unmarked == 0
	}) {
		t.Fatalf("%d rows not marked published within 30s", unmarked)
	}
	var sessions int
	if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE usename = $1`, role).Scan(&sessions); err != nil || sessions == 0 {
		t.Errorf("no session of role %s in pg_stat_activity (err %v): is the relay really running as it?", role, err)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(60 * time.Second); code != 0 {
		t.Fatalf("relay exited %d after SIGTERM:\n%s", code, p.all.String())
	}
	if out := p.all.String(); strings.Contains(out, "permission denied") || strings.Contains(out, "42501") {
		t.Errorf("relay output mentions a missing privilege:\n%s", out)
	}

	// status as the role.
	stdout, all, code := runBin(t, vars, 60*time.Second, "status", "--json")
	if code != 0 {
		t.Fatalf("status as the role exited %d:\n%s", code, all)
	}
	var st struct {
		Slot struct {
			Name   string `json:"name"`
			Exists bool   `json:"exists"`
		} `json:"slot"`
		PublicationExists bool  `json:"publication_exists"`
		Unpublished       int64 `json:"unpublished_rows"`
	}
	if err := json.Unmarshal([]byte(stdout), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, stdout)
	}
	if st.Slot.Name != e.slot || !st.Slot.Exists || !st.PublicationExists || st.Unpublished != 0 {
		t.Errorf("status as the role: %+v, want slot %s existing, publication, 0 unpublished", st, e.slot)
	}

	// prune without DELETE fails, and says why; with the script's retention
	// grant it works.
	if _, err := admin.Exec(ctx, `UPDATE outbox_events SET published_at = now() - interval '10 days'
		WHERE id = ANY($1::uuid[])`, ids[:10]); err != nil {
		t.Fatal(err)
	}
	_, all, code = runBin(t, vars, 60*time.Second, "prune", "--older-than", "168h")
	if code == 0 || !strings.Contains(all, "permission denied") {
		t.Fatalf("prune without DELETE: exit %d, want non-zero with permission denied:\n%s", code, all)
	}
	if _, err := admin.Exec(ctx, lpRenderScript(t, map[string]string{
		"relay_role": role, "relay_password": password, "DBNAME": strings.TrimPrefix(u.Path, "/"),
		"outbox_schema": "public", "outbox_table": "outbox_events", "state_schema": "public", "retention": "true",
	}, "retention")); err != nil {
		t.Fatalf("the script's retention grant: %v", err)
	}
	stdout, all, code = runBin(t, vars, 60*time.Second, "prune", "--older-than", "168h", "--batch-size", "3")
	if code != 0 || !strings.Contains(stdout, "deleted 10 rows") {
		t.Fatalf("prune as the role: exit %d, want 0 and \"deleted 10 rows\":\n%s", code, all)
	}
	var left int
	if err := admin.QueryRow(ctx, `SELECT count(*) FROM outbox_events`).Scan(&left); err != nil || left != n-10 {
		t.Fatalf("after prune: %d rows (err %v), want %d", left, err, n-10)
	}

	// A REPLICATION role reads pg_replication_slots and drops its own slot
	// (the relay does when the slot is lost).
	rc, err := pgx.Connect(ctx, roleURL)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close(context.Background())
	var active bool
	if err := rc.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, e.slot).Scan(&active); err != nil {
		t.Fatalf("pg_replication_slots as the role: %v", err)
	}
	if _, err := rc.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, e.slot); err != nil {
		t.Fatalf("pg_drop_replication_slot as the role: %v", err)
	}
	if _, _, exists := testenv.SlotState(t, e.dbURL, e.slot); exists {
		t.Fatal("slot still exists after the role dropped it")
	}
}

// lpRenderScript reads deploy/least-privilege.sql and does what psql would
// with vars: meta-commands (\set, \warn, \if …) are interpreted or dropped,
// :"name" becomes a quoted identifier and :'name' a quoted literal. With
// only, just the SQL inside the \if :<only> blocks is returned.
func lpRenderScript(t *testing.T, vars map[string]string, only ...string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "least-privilege.sql"))
	if err != nil {
		t.Fatal(err)
	}
	type cond struct {
		name string
		on   bool
	}
	var stack []cond
	var out strings.Builder
	ref := regexp.MustCompile(`:"(\w+)"|:'(\w+)'`)
	for i, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, `\`) {
			fields := strings.Fields(trimmed)
			switch fields[0] {
			case `\if`:
				arg := fields[1]
				switch {
				case strings.HasPrefix(arg, ":{?"): // is the variable set? all are
					stack = append(stack, cond{"", true})
				case strings.HasPrefix(arg, ":"):
					v, ok := vars[arg[1:]]
					if !ok {
						t.Fatalf("least-privilege.sql:%d: variable %s not given", i+1, arg)
					}
					stack = append(stack, cond{arg[1:], v == "true" || v == "on" || v == "1"})
				default:
					t.Fatalf("least-privilege.sql:%d: cannot render %q", i+1, trimmed)
				}
			case `\else`:
				stack[len(stack)-1].on = !stack[len(stack)-1].on
			case `\endif`:
				stack = stack[:len(stack)-1]
			case `\set`, `\warn`, `\echo`:
			default:
				t.Fatalf("least-privilege.sql:%d: cannot render %q", i+1, trimmed)
			}
			continue
		}
		on, inOnly := true, false
		for _, c := range stack {
			on = on && c.on
			for _, o := range only {
				inOnly = inOnly || c.name == o
			}
		}
		if !on || (len(only) > 0 && !inOnly) {
			continue
		}
		var missing string
		line = ref.ReplaceAllStringFunc(line, func(m string) string {
			name := m[2 : len(m)-1]
			v, ok := vars[name]
			if !ok {
				missing = name
			}
			if m[1] == '"' {
				return pgx.Identifier{v}.Sanitize()
			}
			return "'" + strings.ReplaceAll(v, "'", "''") + "'"
		})
		if missing != "" {
			t.Fatalf("least-privilege.sql:%d: variable %s not given", i+1, missing)
		}
		fmt.Fprintln(&out, line)
	}
	if len(stack) != 0 {
		t.Fatal("least-privilege.sql: unterminated \\if")
	}
	return out.String()
}

func lpRandomHex(t *testing.T) string {
	t.Helper()
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}
