package main

// These tests run the built binary as a subprocess, the way an operator or a
// supervisor does: exit codes, what it prints, how it stops. The integration
// tests use a fresh database, slot, exchange and dead-letter exchange each
// (internal/testenv).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

const secret = "sekret"

func TestVersion(t *testing.T) {
	stdout, all, code := runBin(t, nil, 30*time.Second, "version")
	if code != 0 {
		t.Fatalf("version exited %d:\n%s", code, all)
	}
	if v := strings.TrimSpace(stdout); !strings.HasPrefix(v, "outbox-relay ") || len(v) <= len("outbox-relay ") {
		t.Fatalf("version printed %q, want \"outbox-relay <version>\"", stdout)
	}
}

func TestUnknownCommandExits2(t *testing.T) {
	_, all, code := runBin(t, nil, 30*time.Second, "frobnicate")
	if code != 2 || !strings.Contains(all, `unknown command "frobnicate"`) || !strings.Contains(all, "usage:") {
		t.Fatalf("exit %d, output:\n%s\nwant exit 2 naming the command, with the usage", code, all)
	}
}

func TestHelpPrintsTheUsage(t *testing.T) {
	for _, arg := range []string{"help", "-h", "--help"} {
		stdout, all, code := runBin(t, nil, 30*time.Second, arg)
		if code != 0 || !strings.Contains(stdout, "usage: outbox-relay") || !strings.Contains(stdout, "commands:") {
			t.Fatalf("outbox-relay %s: exit %d, output:\n%s\nwant exit 0 and the usage on stdout", arg, code, all)
		}
	}
}

// Configuration is checked before anything connects: these need no services.
func TestBadConfigurationExitsNamingTheVariable(t *testing.T) {
	valid := map[string]string{
		"RELAY_DATABASE_URL": "postgres://relay:" + secret + "@127.0.0.1:1/outbox?sslmode=disable",
		"RELAY_AMQP_URL":     "amqp://guest:" + secret + "@127.0.0.1:1/",
		"RELAY_METRICS_ADDR": "127.0.0.1:0",
	}
	cases := []struct {
		name     string
		vars     map[string]string
		variable string
	}{
		{"missing database URL", with(valid, "RELAY_DATABASE_URL", "\x00"), "RELAY_DATABASE_URL"},
		{"empty database URL", with(valid, "RELAY_DATABASE_URL", ""), "RELAY_DATABASE_URL"},
		{"malformed database URL port", with(valid, "RELAY_DATABASE_URL", "postgres://relay:"+secret+"@127.0.0.1:5432:99/outbox"), "RELAY_DATABASE_URL"},
		{"malformed database URL option", with(valid, "RELAY_DATABASE_URL", "postgres://relay:"+secret+"@127.0.0.1/outbox?sslmode=bogus"), "RELAY_DATABASE_URL"},
		{"malformed keyword/value string", with(valid, "RELAY_DATABASE_URL", "host=127.0.0.1 password="+secret+" port=notaport"), "RELAY_DATABASE_URL"},
		{"slot name", with(valid, "RELAY_SLOT", "Bad-Name"), "RELAY_SLOT"},
		{"log level", with(valid, "RELAY_LOG_LEVEL", "loud"), "RELAY_LOG_LEVEL"},
	}
	for _, tc := range cases {
		for _, cmd := range []string{"run", "migrate", "status"} {
			t.Run(tc.name+"/"+cmd, func(t *testing.T) {
				_, all, code := runBin(t, tc.vars, 30*time.Second, cmd)
				if code == 0 {
					t.Fatalf("exit 0, want non-zero; output:\n%s", all)
				}
				if !strings.Contains(all, tc.variable) {
					t.Errorf("output does not name %s:\n%s", tc.variable, all)
				}
				if strings.Contains(all, secret) {
					t.Errorf("output contains the password:\n%s", all)
				}
			})
		}
	}
	t.Run("broker URL/run", func(t *testing.T) {
		_, all, code := runBin(t, with(valid, "RELAY_AMQP_URL", "http://guest:"+secret+"@127.0.0.1/"), 30*time.Second, "run")
		if code == 0 || !strings.Contains(all, "RELAY_AMQP_URL") || strings.Contains(all, secret) {
			t.Fatalf("exit %d, output:\n%s\nwant non-zero naming RELAY_AMQP_URL without the password", code, all)
		}
	})
}

func TestMissingDatabaseExitsNamingIt(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	u, err := url.Parse(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	missing := testenv.Name(t, "missing")
	u.Path = "/" + missing
	// With trust authentication the password is ignored; with a real one
	// (the Docker path) keep it, so the failure is the database, not the login.
	leak := ":" + secret + "@"
	if pw, ok := u.User.Password(); ok {
		leak = ":" + pw + "@"
	} else {
		u.User = url.UserPassword(u.User.Username(), secret)
	}
	vars := with(e.vars(), "RELAY_DATABASE_URL", u.String())

	for _, cmd := range []string{"run", "migrate", "status"} {
		t.Run(cmd, func(t *testing.T) {
			_, all, code := runBin(t, vars, 60*time.Second, cmd)
			if code == 0 {
				t.Fatalf("exit 0, want non-zero; output:\n%s", all)
			}
			if !strings.Contains(all, missing) {
				t.Errorf("output does not name database %s:\n%s", missing, all)
			}
			if strings.Contains(all, leak) || strings.Contains(all, secret) {
				t.Errorf("output contains the password:\n%s", all)
			}
		})
	}
}

func TestBrokerDownKeepsRetryingThenStopsOnSIGTERM(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)

	p := start(t, with(e.vars(), "RELAY_AMQP_URL", "amqp://guest:"+secret+"@127.0.0.1:1/"), "run")
	// Two logged errors naming RabbitMQ prove it retries rather than giving up.
	if !eventually(5*time.Second, func() bool { return countBrokerErrors(p.all.String()) >= 2 }) {
		t.Fatalf("no repeated error naming RabbitMQ within 5s (exited: %v); output:\n%s", p.exited(), p.all.String())
	}
	if p.exited() {
		t.Fatalf("exited with %d while the broker is down; it must keep retrying", p.code)
	}
	p.signal(syscall.SIGTERM)
	code := p.wait(10 * time.Second)
	if code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if out := p.all.String(); strings.Contains(out, secret) {
		t.Errorf("output contains the broker password:\n%s", out)
	}
}

// TestOneProcessorUnlessGOMAXPROCS: run uses one processor by default and
// respects GOMAXPROCS when the operator sets it.
func TestOneProcessorUnlessGOMAXPROCS(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)
	for _, c := range []struct{ env, want string }{{"", `"gomaxprocs":1,`}, {"2", `"gomaxprocs":2,`}} {
		t.Run("GOMAXPROCS="+c.env, func(t *testing.T) {
			vars := with(with(e.vars(), "RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/"), "GOMAXPROCS", c.env)
			p := start(t, vars, "run")
			if !p.waitOutput("starting outbox-relay", 10*time.Second) {
				t.Fatalf("no start line; output:\n%s", p.all.String())
			}
			if out := p.all.String(); !strings.Contains(out, c.want) {
				t.Errorf("start line without %s:\n%s", c.want, out)
			}
			p.signal(syscall.SIGTERM)
			p.wait(10 * time.Second)
		})
	}
}

// countBrokerErrors counts error-level JSON log lines that name RabbitMQ.
func countBrokerErrors(out string) int {
	n := 0
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var line struct {
			Level string `json:"level"`
		}
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Level == "error" && strings.Contains(sc.Text(), "RabbitMQ") {
			n++
		}
	}
	return n
}

func TestMigrateTwiceIsIdempotent(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)

	first := e.migrate(t)
	if !strings.Contains(first, "applied") {
		t.Errorf("first migrate printed %q, want the migrations it applied", first)
	}
	second := e.migrate(t)
	if !strings.Contains(second, "up to date") || strings.Contains(second, "applied") {
		t.Errorf("second migrate printed %q, want \"up to date\" and nothing applied", second)
	}

	db := e.conn(t)
	var table, pub bool
	if err := db.QueryRow(t.Context(), `SELECT to_regclass('public.outbox_events') IS NOT NULL,
		EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay_pub')`).Scan(&table, &pub); err != nil {
		t.Fatal(err)
	}
	if !table || !pub {
		t.Errorf("after migrate: table exists %v, publication exists %v", table, pub)
	}
}

// TestSIGTERMUnderLoad stops the relay while a producer writes steadily, and
// checks the graceful stop's promise: exit 0 promptly, every event delivered
// was marked, nothing acknowledged that was not done (a restart delivers the
// rest), and no duplicates across the two runs.
func TestSIGTERMUnderLoad(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)
	cons := newConsumer(t, e.amqpURL, e.exchange)
	db := e.conn(t)

	relay1 := start(t, e.vars(), "run")
	if !relay1.waitOutput(`"message":"streaming"`, 30*time.Second) {
		t.Fatalf("the relay did not start streaming within 30s")
	}

	prod := startProducer(t, e.dbURL, 20000)
	if !eventually(30*time.Second, func() bool { n, _, _ := cons.snapshot(); return n >= 500 }) {
		t.Fatalf("the consumer did not receive 500 events within 30s")
	}

	unpublished := func() int {
		var n int
		if err := db.QueryRow(t.Context(), `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	inFlight := unpublished()
	sigAt := time.Now()
	relay1.signal(syscall.SIGTERM)
	code := relay1.wait(15 * time.Second)
	took := time.Since(sigAt)
	t.Logf("SIGTERM with %d committed rows unpublished; the relay exited %d after %s", inFlight, code, took.Round(time.Millisecond))
	if code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}
	if took > 10*time.Second {
		t.Errorf("the relay took %s to exit after SIGTERM, want under 10s", took)
	}
	_, rolledBack := prod.stop()
	// The table is the truth: a COMMIT cut short by the stop may have landed.
	var committed int
	if err := db.QueryRow(t.Context(), `SELECT count(*) FROM outbox_events`).Scan(&committed); err != nil {
		t.Fatal(err)
	}
	t.Logf("producer: %d rows committed, %d rolled back", committed, len(rolledBack))

	// The slot is released and has a position.
	if !eventually(10*time.Second, func() bool { active, _, exists := testenv.SlotState(t, e.dbURL, e.slot); return exists && !active }) {
		t.Fatalf("slot %s is missing or still active after the relay exited", e.slot)
	}
	_, flushed, _ := testenv.SlotState(t, e.dbURL, e.slot)
	if flushed == "" {
		t.Errorf("slot %s has no confirmed_flush_lsn after a graceful stop", e.slot)
	}

	// Every row marked was confirmed, so it reaches the queue; every message
	// received was confirmed, and a graceful stop marks what was confirmed.
	rows, err := db.Query(t.Context(), `SELECT id::text FROM outbox_events WHERE published_at IS NOT NULL`)
	if err != nil {
		t.Fatal(err)
	}
	marked, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	markedSet := make(map[string]bool, len(marked))
	for _, id := range marked {
		markedSet[id] = true
	}
	if !eventually(10*time.Second, func() bool { n, _, _ := cons.snapshot(); return n >= len(marked) }) {
		n, _, _ := cons.snapshot()
		t.Errorf("after the first run %d rows are marked but only %d distinct messages arrived", len(marked), n)
	}
	var unmarked []string
	for _, id := range cons.ids() {
		if !markedSet[id] {
			unmarked = append(unmarked, id)
		}
	}
	if len(unmarked) > 0 {
		t.Errorf("%d messages were delivered but their rows are not marked after a graceful stop, e.g. %s",
			len(unmarked), unmarked[0])
	}
	t.Logf("after the first run: %d rows marked, %d left for the restart", len(marked), committed-len(marked))

	// The restart delivers exactly the rest.
	relay2 := start(t, e.vars(), "run")
	ok := eventually(60*time.Second, func() bool {
		n, _, _ := cons.snapshot()
		return n >= committed && unpublished() == 0
	})
	relay2.signal(syscall.SIGTERM)
	if code := relay2.wait(15 * time.Second); code != 0 {
		t.Errorf("second run: exit code after SIGTERM = %d, want 0", code)
	}
	distinct, total, dups := cons.snapshot()
	if !ok {
		t.Fatalf("after the restart: %d of %d committed rows delivered, %d unpublished", distinct, committed, unpublished())
	}
	// Count again: a COMMIT cut short by the producer's stop can land on the
	// server after the first count, and the restart rightly delivers it.
	if err := db.QueryRow(t.Context(), `SELECT count(*) FROM outbox_events`).Scan(&committed); err != nil {
		t.Fatal(err)
	}
	if distinct != committed {
		t.Errorf("delivered %d distinct events, committed %d", distinct, committed)
	}
	if len(dups) > 0 {
		t.Errorf("%d deliveries for %d events: duplicates after a graceful stop: %v", total, distinct, head(dups, 10))
	}
	for _, id := range rolledBack {
		if cons.received(id) {
			t.Errorf("rolled-back row %s was published", id)
			break
		}
	}
	if bad := cons.badDeliveries(); len(bad) > 0 {
		t.Errorf("%d messages with wrong properties, e.g. %s", len(bad), bad[0])
	}
}

func head(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// producer inserts outbox rows steadily, one transaction in ten rolled back.
type producer struct {
	cancel     context.CancelFunc
	done       chan struct{}
	mu         sync.Mutex
	committed  int
	rolledBack []string
	err        error
	t          *testing.T
}

func startProducer(t *testing.T, dbURL string, maxRows int) *producer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &producer{cancel: cancel, done: make(chan struct{}), t: t}
	conn, err := pgx.Connect(t.Context(), dbURL)
	if err != nil {
		t.Fatalf("producer: connect: %v", err)
	}
	const insert = `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'order', gen_random_uuid(), 'created', jsonb_build_object('n', g)
		FROM generate_series(1, $1::int) g RETURNING id::text`
	go func() {
		defer close(p.done)
		defer conn.Close(context.Background())
		for txn := 1; ctx.Err() == nil; txn++ {
			p.mu.Lock()
			full := p.committed >= maxRows
			p.mu.Unlock()
			if full {
				<-ctx.Done()
				return
			}
			size := 1 + rand.IntN(50)
			rollback := txn%10 == 0
			var ids []string
			err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
				rows, err := tx.Query(ctx, insert, size)
				if err != nil {
					return err
				}
				if ids, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
					return err
				}
				if rollback {
					return errRollback
				}
				return nil
			})
			p.mu.Lock()
			switch {
			case errors.Is(err, errRollback):
				p.rolledBack = append(p.rolledBack, ids...)
			case err == nil:
				p.committed += len(ids)
			case ctx.Err() == nil:
				p.err = err
				p.mu.Unlock()
				return
			}
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-p.done })
	return p
}

var errRollback = errors.New("rollback on purpose")

// stop stops the producer and returns the rows it counted as committed and
// the ids of the rows it rolled back.
func (p *producer) stop() (committed int, rolledBack []string) {
	p.t.Helper()
	p.cancel()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		p.t.Fatalf("producer: %v", p.err)
	}
	return p.committed, p.rolledBack
}

type statusJSON struct {
	Slot struct {
		Name              string  `json:"name"`
		Exists            bool    `json:"exists"`
		ConfirmedFlushLSN *string `json:"confirmed_flush_lsn"`
	} `json:"slot"`
	PublicationExists bool     `json:"publication_exists"`
	Unpublished       *int64   `json:"unpublished_rows"`
	Problems          []string `json:"problems"`
}

func TestStatusAfterRun(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)
	newConsumer(t, e.amqpURL, e.exchange)
	db := e.conn(t)

	p := start(t, e.vars(), "run")
	if !p.waitOutput(`"message":"streaming"`, 30*time.Second) {
		t.Fatalf("the relay did not start streaming within 30s")
	}
	if _, err := db.Exec(t.Context(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
		SELECT gen_random_uuid(), 'customer', gen_random_uuid(), 'updated', '{}' FROM generate_series(1, 20)`); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool {
		var n int
		return db.QueryRow(t.Context(), `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&n) == nil && n == 0
	}) {
		t.Fatalf("rows not published within 30s")
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}

	stdout, all, code := runBin(t, e.vars(), 30*time.Second, "status", "--json")
	if code != 0 {
		t.Errorf("status --json exited %d, want 0:\n%s", code, all)
	}
	var st statusJSON
	if err := json.Unmarshal([]byte(stdout), &st); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, stdout)
	}
	if st.Slot.Name != e.slot || !st.Slot.Exists {
		t.Errorf("status: slot %q exists=%v, want %q existing", st.Slot.Name, st.Slot.Exists, e.slot)
	}
	if st.Slot.ConfirmedFlushLSN == nil || *st.Slot.ConfirmedFlushLSN == "" {
		t.Errorf("status: no confirmed_flush_lsn")
	}
	if st.Unpublished == nil || *st.Unpublished != 0 {
		t.Errorf("status: unpublished_rows = %v, want 0", st.Unpublished)
	}
	if !st.PublicationExists || len(st.Problems) != 0 {
		t.Errorf("status: publication_exists=%v problems=%v, want true and none", st.PublicationExists, st.Problems)
	}

	text, all, code := runBin(t, e.vars(), 30*time.Second, "status")
	if code != 0 || !strings.Contains(text, e.slot) || !strings.Contains(text, "confirmed_flush_lsn") {
		t.Errorf("status exited %d, want 0 with the slot and its confirmed_flush_lsn:\n%s", code, all)
	}
}

func TestStatusMissingSlotExits1(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)

	text, all, code := runBin(t, e.vars(), 30*time.Second, "status")
	if code != 1 {
		t.Errorf("status exited %d, want 1:\n%s", code, all)
	}
	if !strings.Contains(text, e.slot) || !strings.Contains(text, "does not exist") {
		t.Errorf("status does not say slot %s does not exist:\n%s", e.slot, all)
	}

	stdout, all, code := runBin(t, e.vars(), 30*time.Second, "status", "--json")
	if code != 1 {
		t.Errorf("status --json exited %d, want 1:\n%s", code, all)
	}
	var st statusJSON
	if err := json.Unmarshal([]byte(stdout), &st); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, stdout)
	}
	if st.Slot.Exists || len(st.Problems) == 0 || !strings.Contains(strings.Join(st.Problems, "\n"), e.slot) {
		t.Errorf("status --json: exists=%v problems=%v, want a problem naming slot %s", st.Slot.Exists, st.Problems, e.slot)
	}
}
