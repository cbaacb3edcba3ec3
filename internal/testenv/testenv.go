// Package testenv is the harness every integration test uses to reach a real
// PostgreSQL (wal_level=logical) and RabbitMQ.
//
// Where the services come from, in order:
//
//  1. OUTBOX_TEST_DATABASE_URL and OUTBOX_TEST_AMQP_URL, when set. `make test`
//     sets them (scripts/test-env.sh): to this machine's own services, which
//     scripts/local-services.sh configures, or to docker compose services.
//  2. Otherwise, when a Docker engine answers, containers started once per
//     test binary with testcontainers-go (postgres:15 with wal_level=logical,
//     rabbitmq:3.13-management); Ryuk removes them when the binary exits.
//  3. Otherwise the test fails with a message saying what to set or run.
//
// A missing service is a failure, never a skip: a green run must mean the
// integration tests ran. The only skip is Integration under `go test -short`
// (`make unit`); `make test` never passes -short.
//
// Every test gets its own database (Postgres) and its own slot, exchange and
// queue names (Name, Slot). Cleanups drop the slots first, terminating their
// walsenders, because a forgotten logical slot pins WAL on the shared server
// and blocks DROP DATABASE.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	tcrabbitmq "github.com/testcontainers/testcontainers-go/modules/rabbitmq"
)

// Environment variables read by this package.
const (
	// EnvDatabaseURL is an admin URL (may CREATE/DROP DATABASE) of a server
	// with wal_level=logical, e.g.
	// postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable.
	EnvDatabaseURL = "OUTBOX_TEST_DATABASE_URL"
	// EnvAMQPURL is a RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/.
	EnvAMQPURL = "OUTBOX_TEST_AMQP_URL"
)

// Images used on the Docker path; they match docker-compose.yml.
const (
	postgresImage = "postgres:15"
	rabbitmqImage = "rabbitmq:3.13-management"
)

const cleanupTimeout = 30 * time.Second

// Integration skips the test under `go test -short` and does nothing
// otherwise. Call it first in every integration test.
func Integration(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: needs PostgreSQL and RabbitMQ")
	}
}

// Postgres returns the URL of a fresh, empty database created for this test.
// When the test ends, its replication slots are dropped (walsenders
// terminated first), its connections terminated and the database dropped.
func Postgres(t testing.TB) string {
	t.Helper()
	admin := adminURL(t)
	name := Name(t, "relaytest")

	conn := connect(t, admin)
	defer conn.Close(context.Background())
	if _, err := conn.Exec(t.Context(), "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("testenv: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := dropDatabase(admin, name); err != nil {
			t.Errorf("testenv: cleanup of database %s: %v", name, err)
		}
	})

	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("testenv: %v", err) // adminURL already parsed it
	}
	u.Path = "/" + name
	return u.String()
}

// AMQP returns the URL of a RabbitMQ broker. Tests share the broker, so
// declare exchanges and queues with names from Name.
func AMQP(t testing.TB) string {
	t.Helper()
	if u := os.Getenv(EnvAMQPURL); u != "" {
		return u
	}
	rabbit.once.Do(func() { rabbit.url, rabbit.err = startRabbitMQ() })
	if rabbit.err != nil {
		t.Fatalf("testenv: %s is not set and %v.\nSet %s=amqp://guest:guest@127.0.0.1:5672/ "+
			"or run `make test`, which configures the local services", EnvAMQPURL, rabbit.err, EnvAMQPURL)
	}
	return rabbit.url
}

// Name returns a unique name for this test matching ^[a-z0-9_]{1,63}$,
// usable as a database, slot, exchange or queue name:
// <prefix>_<test name>_<random>, the test name shortened to fit.
func Name(t testing.TB, prefix string) string {
	t.Helper()
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("testenv: random: %v", err)
	}
	suffix := hex.EncodeToString(b[:])

	prefix = sanitize(prefix)
	if len(prefix) > 20 {
		prefix = prefix[:20]
	}
	parts := make([]string, 0, 3)
	if prefix != "" {
		parts = append(parts, prefix)
	}
	room := 63 - len(suffix) - 1 - len(prefix) - 1
	if test := sanitize(strings.TrimPrefix(t.Name(), "Test")); test != "" && room > 0 {
		if len(test) > room {
			test = strings.TrimRight(test[:room], "_")
		}
		parts = append(parts, test)
	}
	return strings.Join(append(parts, suffix), "_")
}

var unsafeChars = regexp.MustCompile(`[^a-z0-9]+`)

func sanitize(s string) string {
	return strings.Trim(unsafeChars.ReplaceAllString(strings.ToLower(s), "_"), "_")
}

// Slot returns a unique replication slot name for this test; it does not
// create the slot. A cleanup drops the slot if it exists when the test ends,
// terminating its walsender first. dbURL is any database on the server.
func Slot(t testing.TB, dbURL string) string {
	t.Helper()
	name := Name(t, "slot")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		conn, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			t.Errorf("testenv: cleanup of slot %s: connect: %v", name, err)
			return
		}
		defer conn.Close(context.Background())
		if err := dropSlot(ctx, conn, name); err != nil {
			t.Errorf("testenv: cleanup of slot %s: %v", name, err)
		}
	})
	return name
}

// SlotState reads the slot's row in pg_replication_slots. confirmedFlush is
// confirmed_flush_lsn as text ("" when NULL); exists is false if there is no
// such slot.
func SlotState(t testing.TB, dbURL, slot string) (active bool, confirmedFlush string, exists bool) {
	t.Helper()
	conn := connect(t, dbURL)
	defer conn.Close(context.Background())
	err := conn.QueryRow(t.Context(),
		`SELECT active, coalesce(confirmed_flush_lsn::text, '') FROM pg_replication_slots WHERE slot_name = $1`,
		slot).Scan(&active, &confirmedFlush)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, "", false
	}
	if err != nil {
		t.Fatalf("testenv: read slot %s: %v", slot, err)
	}
	return active, confirmedFlush, true
}

// connect opens a connection or fails the test.
func connect(t testing.TB, dbURL string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatalf("testenv: connect to %s: %v", redact(dbURL), err)
	}
	return conn
}

// --- where PostgreSQL comes from ---------------------------------------------

var (
	pg struct {
		once sync.Once
		url  string
		err  error
	}
	rabbit struct {
		once sync.Once
		url  string
		err  error
	}
	walCheck struct {
		once sync.Once
		err  error
	}
)

// adminURL returns the admin URL of a server with wal_level=logical, or fails
// the test with what to do.
func adminURL(t testing.TB) string {
	t.Helper()
	admin := os.Getenv(EnvDatabaseURL)
	if admin == "" {
		pg.once.Do(func() { pg.url, pg.err = startPostgres() })
		if pg.err != nil {
			t.Fatalf("testenv: %s is not set and %v.\nSet %s=postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable "+
				"(a server with wal_level=logical) or run `make test`, which configures the local services",
				EnvDatabaseURL, pg.err, EnvDatabaseURL)
		}
		admin = pg.url
	}
	if u, err := url.Parse(admin); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Fatalf("testenv: %s must be a postgres:// URL, got %q", EnvDatabaseURL, redact(admin))
	}

	walCheck.once.Do(func() { walCheck.err = checkWalLevel(admin) })
	if walCheck.err != nil {
		t.Fatalf("testenv: %v", walCheck.err)
	}
	return admin
}

func checkWalLevel(admin string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return fmt.Errorf("connect to %s: %w (is PostgreSQL running? scripts/local-services.sh starts and configures it)", redact(admin), err)
	}
	defer conn.Close(context.Background())
	var level string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&level); err != nil {
		return fmt.Errorf("SHOW wal_level: %w", err)
	}
	if level != "logical" {
		return fmt.Errorf("%s has wal_level=%s, the relay needs logical: run scripts/local-services.sh "+
			"(it sets wal_level=logical and restarts PostgreSQL)", redact(admin), level)
	}
	return nil
}

// errNoDocker explains why no container was started.
var errNoDocker = errors.New("no Docker engine answers")

// dockerAvailable reports whether testcontainers can reach a Docker engine.
func dockerAvailable() (ok bool) {
	defer func() {
		if recover() != nil { // testcontainers panics on some broken setups
			ok = false
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	provider, err := testcontainers.ProviderDefault.GetProvider()
	if err != nil {
		return false
	}
	defer provider.Close()
	return provider.Health(ctx) == nil
}

func startPostgres() (string, error) {
	if !dockerAvailable() {
		return "", errNoDocker
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := tcpostgres.Run(ctx, postgresImage,
		tcpostgres.WithDatabase("postgres"),
		tcpostgres.WithUsername("postgres"),
		tcpostgres.WithPassword("postgres"),
		testcontainers.WithCmd("postgres", "-c", "fsync=off",
			"-c", "wal_level=logical", "-c", "max_replication_slots=64", "-c", "max_wal_senders=64"),
		tcpostgres.BasicWaitStrategies(),
	)
	if err != nil {
		return "", fmt.Errorf("Docker answers but the %s container did not start: %w", postgresImage, err)
	}
	return c.ConnectionString(ctx, "sslmode=disable")
}

func startRabbitMQ() (string, error) {
	if !dockerAvailable() {
		return "", errNoDocker
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := tcrabbitmq.Run(ctx, rabbitmqImage)
	if err != nil {
		return "", fmt.Errorf("Docker answers but the %s container did not start: %w", rabbitmqImage, err)
	}
	return c.AmqpURL(ctx)
}

// --- cleanup -----------------------------------------------------------------

// SQLSTATEs this package reacts to.
const (
	sqlstateObjectInUse     = "55006" // slot active, database in use
	sqlstateUndefinedObject = "42704" // slot does not exist
)

func isPgCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}

// dropSlot drops a slot if it exists. An active slot's walsender is
// terminated first; the slot stays active until that backend has exited, so
// the drop is retried briefly.
func dropSlot(ctx context.Context, conn *pgx.Conn, slot string) error {
	for {
		var pid *int32
		err := conn.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&pid)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read slot: %w", err)
		}
		if pid != nil {
			if _, err := conn.Exec(ctx, `SELECT pg_terminate_backend($1)`, *pid); err != nil {
				return fmt.Errorf("terminate walsender %d: %w", *pid, err)
			}
		}
		_, err = conn.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot)
		switch {
		case err == nil, isPgCode(err, sqlstateUndefinedObject):
			return nil
		case !isPgCode(err, sqlstateObjectInUse):
			return fmt.Errorf("drop: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("slot still active: %w", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// dropDatabase drops every slot of the database, terminates its remaining
// connections and drops it. It runs after the test's own cleanups.
func dropDatabase(admin, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())

	drop := "DROP DATABASE IF EXISTS " + pgx.Identifier{name}.Sanitize() + " WITH (FORCE)"
	for {
		if err := dropSlotsOf(ctx, conn, name); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx,
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`,
			name); err != nil {
			return fmt.Errorf("terminate connections: %w", err)
		}
		_, err := conn.Exec(ctx, drop)
		if err == nil {
			return nil
		}
		// In use: a slot created meanwhile, or a backend still exiting.
		if !isPgCode(err, sqlstateObjectInUse) || ctx.Err() != nil {
			return fmt.Errorf("drop: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func dropSlotsOf(ctx context.Context, conn *pgx.Conn, database string) error {
	rows, err := conn.Query(ctx, `SELECT slot_name FROM pg_replication_slots WHERE database = $1`, database)
	if err != nil {
		return fmt.Errorf("list slots: %w", err)
	}
	slots, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("list slots: %w", err)
	}
	for _, s := range slots {
		if err := dropSlot(ctx, conn, s); err != nil {
			return fmt.Errorf("slot %s: %w", s, err)
		}
	}
	return nil
}

// redact hides the password of a URL for messages.
func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "<unparsable URL>"
	}
	return u.Redacted()
}
