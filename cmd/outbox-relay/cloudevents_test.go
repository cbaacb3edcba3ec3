package main

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"
)

// TestRunSendsCloudEventsAndHeaderColumns: the binary passes
// RELAY_CLOUDEVENTS, its default source (the database and the table) and
// RELAY_HEADER_COLUMNS through to the messages; without RELAY_CLOUDEVENTS
// there are no CloudEvents headers.
func TestRunSendsCloudEventsAndHeaderColumns(t *testing.T) {
	e := newRelayEnv(t)
	e.migrate(t)
	conn := e.conn(t)
	ctx := context.Background()
	if _, err := conn.Exec(ctx, `ALTER TABLE outbox_events ADD COLUMN tenant text`); err != nil {
		t.Fatal(err)
	}
	cc, err := pgx.ParseConfig(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	insert := func(tenant *string) string {
		var id string
		if err := conn.QueryRow(ctx, `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, tenant)
			VALUES (gen_random_uuid(), 'order', gen_random_uuid(), 'created', '{"a":1}', $1) RETURNING id::text`, tenant).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return id
	}
	tenant := "acme"
	for _, ce := range []bool{true, false} {
		vars := with(e.vars(), "RELAY_HEADER_COLUMNS", "tenant")
		if ce {
			vars = with(vars, "RELAY_CLOUDEVENTS", "binary")
		}
		c := newOrderConsumer(t, e.amqpURL, e.exchange)
		withTenant, without := insert(&tenant), insert(nil)
		p := start(t, vars, "run")
		if !eventually(30*time.Second, func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.seen[withTenant] > 0 && c.seen[without] > 0
		}) {
			t.Fatalf("CloudEvents %v: the two events did not arrive", ce)
		}
		p.signal(syscall.SIGTERM)
		if code := p.wait(30 * time.Second); code != 0 {
			t.Fatalf("relay exited %d", code)
		}
		c.mu.Lock()
		for _, d := range c.first {
			if d.MessageId != withTenant && d.MessageId != without {
				continue
			}
			if got, ok := d.Headers["tenant"]; (d.MessageId == withTenant) != ok || (ok && got != tenant) {
				t.Errorf("%s: tenant header %v (present %v)", d.MessageId, got, ok)
			}
			checkCE(t, d, ce, "outbox-relay:"+cc.Database+"/public.outbox_events")
		}
		c.mu.Unlock()
	}
}

func checkCE(t *testing.T, d amqp.Delivery, on bool, source string) {
	t.Helper()
	var ce []string
	for k := range d.Headers {
		if strings.HasPrefix(k, "cloudEvents_") {
			ce = append(ce, k)
		}
	}
	if !on {
		if len(ce) > 0 {
			t.Errorf("%s: CloudEvents headers %v without RELAY_CLOUDEVENTS", d.MessageId, ce)
		}
		return
	}
	want := map[string]any{"cloudEvents_specversion": "1.0", "cloudEvents_id": d.MessageId, "cloudEvents_type": d.Type,
		"cloudEvents_source": source, "cloudEvents_subject": d.Headers["aggregate_id"], "cloudEvents_time": d.Headers["occurred_at"]}
	for k, v := range want {
		if d.Headers[k] != v {
			t.Errorf("%s: %s = %v, want %v", d.MessageId, k, d.Headers[k], v)
		}
	}
	if len(ce) != len(want) || d.ContentType != "application/json" {
		t.Errorf("%s: CloudEvents headers %v, content type %q", d.MessageId, ce, d.ContentType)
	}
}
