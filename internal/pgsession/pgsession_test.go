package pgsession_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/internal/pgsession"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

func pool(t *testing.T, url string, b pgsession.Bounds) *pgxpool.Pool {
	t.Helper()
	pc, err := pgsession.PoolConfig(url, 2, b)
	if err != nil {
		t.Fatal(err)
	}
	p, err := pgxpool.NewWithConfig(context.Background(), pc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// TestSettingsOverrideTheDatabase: the database's defaults do not reach a
// relay session; its own bounds do.
func TestSettingsOverrideTheDatabase(t *testing.T) {
	testenv.Integration(t)
	url := testenv.Postgres(t)
	admin := pool(t, url, pgsession.Bounds{Statement: time.Minute})
	ctx := context.Background()
	var db string
	if err := admin.QueryRow(ctx, `SELECT current_database()`).Scan(&db); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`ALTER DATABASE "` + db + `" SET statement_timeout = '40ms'`,
		`ALTER DATABASE "` + db + `" SET default_transaction_read_only = on`,
		`ALTER DATABASE "` + db + `" SET synchronous_commit = remote_apply`,
		`ALTER DATABASE "` + db + `" SET idle_session_timeout = '1s'`,
	} {
		if _, err := admin.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	p := pool(t, url, pgsession.Bounds{Statement: 30 * time.Second})
	want := map[string]string{
		"statement_timeout":                   "30s",
		"lock_timeout":                        "15s",
		"idle_in_transaction_session_timeout": "30s",
		"default_transaction_read_only":       "off",
		"synchronous_commit":                  "local",
		"default_transaction_isolation":       "read committed",
		"idle_session_timeout":                "0",
	}
	for name, v := range want {
		var got string
		if err := p.QueryRow(ctx, `SELECT current_setting($1)`, name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != v {
			t.Errorf("%s = %s in a relay session, want %s", name, got, v)
		}
	}
}

// TestCancelledQueryStopsOnTheServer: a query whose context ends is
// cancelled on the server, not left running there (pgx's default only
// closes the socket, and a backend waiting on a lock never notices).
func TestCancelledQueryStopsOnTheServer(t *testing.T) {
	testenv.Integration(t)
	url := testenv.Postgres(t)
	p := pool(t, url, pgsession.Bounds{Statement: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := p.Exec(ctx, `SELECT pg_sleep(60) /* outbox-relay cancel test */`)
	if err == nil {
		t.Fatal("pg_sleep(60) returned within 300 ms")
	}
	watch := pool(t, url, pgsession.Bounds{Statement: time.Minute})
	deadline := time.Now().Add(5 * time.Second)
	for {
		var running int
		if err := watch.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE query LIKE '%outbox-relay cancel test%' AND state = 'active' AND pid <> pg_backend_pid()`).Scan(&running); err != nil {
			t.Fatal(err)
		}
		if running == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the timed-out query still runs on the server 5 s after its context ended")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMajor: pre-releases count as their major version; the version gates
// (transaction_timeout, failover slots) must not see 0 for "17beta1".
func TestMajor(t *testing.T) {
	for in, want := range map[string]int{
		"15.20 (Debian 15.20-0+deb12u1)": 15,
		"16.4":                           16,
		"17.2":                           17,
		"17beta1":                        17,
		"18devel":                        18,
		"9.6.24":                         9,
		"":                               0,
		"devel":                          0,
	} {
		if got := pgsession.Major(in); got != want {
			t.Errorf("Major(%q) = %d, want %d", in, got, want)
		}
	}
}
