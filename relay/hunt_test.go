package relay

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// appSearchPath sets search_path on the test's database for every session
// that does not set its own, as a DBA might, and gives the test (the
// application) a pool that names its schema.
func (e *env) appSearchPath(path string) {
	e.t.Helper()
	ctx := context.Background()
	var db string
	must(e.t, e.pool.QueryRow(ctx, `SELECT current_database()`).Scan(&db))
	_, err := e.pool.Exec(ctx, `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` SET search_path = '`+path+`'`)
	must(e.t, err)
	pc, err := pgxpool.ParseConfig(e.dbURL)
	must(e.t, err)
	pc.ConnConfig.RuntimeParams["search_path"] = "public"
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	must(e.t, err)
	e.pool.Close()
	e.pool = pool
	e.t.Cleanup(pool.Close)
	e.t.Cleanup(func() {
		if _, err := pool.Exec(context.Background(), `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` RESET ALL`); err != nil {
			e.t.Errorf("reset the database's settings: %v", err)
		}
	})
}

// checkOnceInOrder asserts that every event arrived exactly once, in the
// order given, and that every row is marked.
func (e *env) checkOnceInOrder(want []event) {
	e.t.Helper()
	got := e.receivedIDs()
	if len(got) != len(want) {
		e.t.Fatalf("received %d messages, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i].ID {
			e.t.Fatalf("message %d is %s, want %s", i, got[i], want[i].ID)
		}
	}
	if n := e.unpublished(); n != 0 {
		e.t.Fatalf("%d rows not marked", n)
	}
}

// TestSearchPathWithoutPublic (invariant 12): a database whose search_path
// does not name the schema of the relay's own tables
// (outbox_relay_slot_state, outbox_relay_confirmed) still has its backlog
// and its new events delivered in order and marked.
func TestSearchPathWithoutPublic(t *testing.T) {
	e := newEnv(t)
	e.appSearchPath("nowhere")
	var backlog []event
	for i := 0; i < 20; i++ {
		backlog = append(backlog, newEvent("order", "created", fmt.Sprintf(`{"i":%d}`, i)))
	}
	e.insertTx(backlog, true, nil)
	r := e.start(nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case err := <-r.done:
			r.done <- err
		case <-time.After(20 * time.Second):
		}
	}()
	waitFor(t, 20*time.Second, "the relay to stream or to return", func() bool {
		select {
		case <-done:
			return true
		default:
		}
		return r.metrics.Ready() == ""
	})
	select {
	case <-done:
		err := <-r.done
		r.done <- err
		t.Fatalf("Run returned %v", err)
	default:
	}
	more := []event{newEvent("order", "paid", `{}`), newEvent("order", "shipped", `{}`)}
	e.insertTx(more, true, nil)
	e.waitReceived(len(backlog)+len(more), 20*time.Second)
	waitFor(t, 10*time.Second, "every row marked", func() bool { return e.unpublished() == 0 })
	r.stop(t)
	e.checkOnceInOrder(append(backlog, more...))
}

// TestStateTablesOffTheSearchPathAreNamed: where the relay's table is in
// several schemas and none is on the search_path, the error says so and
// names them, rather than asking to run migrate.
func TestStateTablesOffTheSearchPathAreNamed(t *testing.T) {
	r := &Relay{schema: "app"}
	visible := "public"
	for _, c := range []struct {
		visible    *string
		everywhere []string
		want       string
	}{
		{&visible, []string{"other", "public"}, "public"},
		{nil, []string{"app", "public"}, "app"},
		{nil, []string{"public"}, "public"},
	} {
		got, err := r.pickStateSchema(confirmedTable, c.visible, c.everywhere, "nowhere")
		if err != nil || got != c.want {
			t.Fatalf("pickStateSchema(%v) = %q, %v; want %q", c.everywhere, got, err, c.want)
		}
	}
	_, err := r.pickStateSchema(confirmedTable, nil, []string{"a", "b"}, "nowhere")
	if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), "schemas a, b") || !strings.Contains(err.Error(), "search_path (nowhere)") {
		t.Fatalf("ambiguous schemas: %v", err)
	}
	_, err = r.pickStateSchema(slotStateTable, nil, nil, "nowhere")
	if !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), "migration 003") {
		t.Fatalf("missing table: %v", err)
	}
}
