package config

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestNATSDefaults(t *testing.T) {
	setEnv(t, map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_SINK": "nats", "RELAY_AMQP_URL": "not checked for nats"})
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if c.NATSURL != "nats://127.0.0.1:4222" || c.NATSStream != "OUTBOX_EVENTS" || c.NATSDeadLetterStream != "OUTBOX_DEAD_LETTER" ||
		c.NATSDeadLetterSubject != "outbox_dead_letter.events" || c.NATSDuplicateWindow != 2*time.Minute ||
		c.RoutingKey != DefaultNATSSubject {
		t.Fatalf("unexpected NATS defaults: %+v", c)
	}
	subjects, err := c.NATSStreamSubjects()
	if err != nil || !slices.Equal(subjects, []string{"outbox.>"}) {
		t.Fatalf("stream subjects %v, %v", subjects, err)
	}

	// RabbitMQ keeps its own default routing key; an explicit one wins for NATS.
	t.Setenv("RELAY_SINK", "rabbitmq")
	t.Setenv("RELAY_AMQP_URL", "amqp://localhost/")
	if c, err := Load(); err != nil || c.RoutingKey != "{aggregate_type}.{event_type}" {
		t.Fatalf("rabbitmq routing key %q, %v", c.RoutingKey, err)
	}
	t.Setenv("RELAY_SINK", "nats")
	t.Setenv("RELAY_ROUTING_KEY", "app.events.{aggregate_type}")
	if c, err := Load(); err != nil || c.RoutingKey != "app.events.{aggregate_type}" {
		t.Fatalf("explicit routing key %q, %v", c.RoutingKey, err)
	}
}

func TestNATSStreamSubjects(t *testing.T) {
	for tmpl, want := range map[string]string{
		"outbox.{aggregate_type}.{event_type}": "outbox.>",
		"a.b.{event_type}":                     "a.b.>",
		"a.b{event_type}.c":                    "a.>",
		"events.all":                           "events.all",
		"{aggregate_type}.{event_type}":        "",
		"outbox..{event_type}":                 "",
		"outbox.*.{event_type}":                "",
		"out box.{event_type}":                 "",
	} {
		c := &Config{RoutingKey: tmpl}
		got, err := c.NATSStreamSubjects()
		if want == "" {
			if err == nil || !strings.Contains(err.Error(), "RELAY_ROUTING_KEY") {
				t.Errorf("%q: %v, %v; want an error naming RELAY_ROUTING_KEY", tmpl, got, err)
			}
			continue
		}
		if err != nil || len(got) != 1 || got[0] != want {
			t.Errorf("%q: %v, %v; want %q", tmpl, got, err, want)
		}
	}
}

func TestNATSErrorsNameTheVariable(t *testing.T) {
	cases := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"RELAY_SINK": "kafka"}, "RELAY_SINK"},
		{map[string]string{"RELAY_NATS_URL": "http://x"}, "RELAY_NATS_URL"},
		{map[string]string{"RELAY_NATS_URL": "nats://a:4222, bad"}, "RELAY_NATS_URL"},
		{map[string]string{"RELAY_NATS_STREAM": "a.b"}, "RELAY_NATS_STREAM"},
		{map[string]string{"RELAY_NATS_DEAD_LETTER_STREAM": "OUTBOX_EVENTS"}, "RELAY_NATS_DEAD_LETTER_STREAM must differ"},
		{map[string]string{"RELAY_NATS_DEAD_LETTER_SUBJECT": "dead.>"}, "RELAY_NATS_DEAD_LETTER_SUBJECT"},
		{map[string]string{"RELAY_NATS_DEAD_LETTER_SUBJECT": "outbox.dead"}, "falls under"},
		{map[string]string{"RELAY_ROUTING_KEY": "{aggregate_type}.{event_type}"}, "must start with a literal subject token"},
		{map[string]string{"RELAY_NATS_DUPLICATE_WINDOW": "0s"}, "RELAY_NATS_DUPLICATE_WINDOW"},
	}
	for _, tc := range cases {
		t.Run(tc.want, func(t *testing.T) {
			setEnv(t, map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_SINK": "nats"})
			setEnv(t, tc.env)
			_, err := Load()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}
