package config

import (
	"strings"
	"testing"
)

func setEnv(t *testing.T, kv map[string]string) {
	t.Helper()
	for k, v := range kv {
		t.Setenv(k, v)
	}
}

func TestDefaults(t *testing.T) {
	setEnv(t, map[string]string{"RELAY_DATABASE_URL": "postgres://u:secret@db:5432/app"})
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if c.Slot != "outbox_relay" || c.Publication != "outbox_relay_pub" || c.Table != "public.outbox_events" ||
		c.Exchange != "outbox.events" || c.DeadLetterExchange != "outbox.events.dead-letter" ||
		c.RoutingKey != "{aggregate_type}.{event_type}" || c.MetricsAddr != ":9740" ||
		c.LogLevel != "info" || c.LogFormat != "json" || c.AMQPURL != "amqp://guest:guest@localhost:5672/" ||
		c.DeadLetterQueueType != QueueClassic {
		t.Fatalf("unexpected defaults: %+v", c)
	}
}

func TestErrorsNameTheVariable(t *testing.T) {
	cases := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{}, "RELAY_DATABASE_URL is required"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://u:hunter2@db:notaport/x"}, "RELAY_DATABASE_URL is not a valid"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_SLOT": "Bad-Slot"}, "RELAY_SLOT"},
		// PostgreSQL accepts it, but unquoted START_REPLICATION cannot read it.
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_SLOT": "1slot"}, "RELAY_SLOT"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_LOG_LEVEL": "loud"}, "RELAY_LOG_LEVEL"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_AMQP_URL": "http://x"}, "RELAY_AMQP_URL"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_ROUTING_KEY": "{nope}"}, "RELAY_ROUTING_KEY"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_PUBLISH_WINDOW": "0"}, "RELAY_PUBLISH_WINDOW"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_MAX_INFLIGHT_BYTES": "0"}, "RELAY_MAX_INFLIGHT_BYTES must be positive"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_MAX_INFLIGHT_BYTES": "64MiB"}, "RELAY_MAX_INFLIGHT_BYTES"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_TABLE": "a.b.c"}, "RELAY_TABLE"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_UNROUTABLE": "ignore"}, "RELAY_UNROUTABLE"},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_DEAD_LETTER_QUEUE_TYPE": "stream"}, `RELAY_DEAD_LETTER_QUEUE_TYPE "stream" is not one of classic, quorum`},
		{map[string]string{"RELAY_DATABASE_URL": "postgres://db/x", "RELAY_STATUS_INTERVAL": "soon"}, "RELAY_STATUS_INTERVAL"},
	}
	for _, tc := range cases {
		t.Run(tc.want, func(t *testing.T) {
			t.Setenv("RELAY_DATABASE_URL", "")
			setEnv(t, tc.env)
			_, err := Load()
			if err == nil {
				t.Fatal("Load accepted bad configuration")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name %s", err, tc.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error leaks the password: %q", err)
			}
		})
	}
}

func TestRedact(t *testing.T) {
	cases := map[string]string{
		"postgres://user:s3cret@db:5432/app?sslmode=disable": "postgres://user:xxxxx@db:5432/app?sslmode=disable",
		"amqp://guest:s3cret@rabbit:5672/":                   "amqp://guest:xxxxx@rabbit:5672/",
		"host=db user=u password=s3cret dbname=app":          "host=db user=u password=xxxxx dbname=app",
		"host=db password='s3 cret' dbname=app":              "host=db password=xxxxx dbname=app",
		"postgres://db/app?password=s3cret":                  "postgres://db/app?password=xxxxx",
		"postgres://user@db/app":                             "postgres://user@db/app",
	}
	for in, want := range cases {
		if got := Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRoutingKey(t *testing.T) {
	k, err := ParseRoutingKey("{aggregate_type}.{event_type}")
	if err != nil {
		t.Fatal(err)
	}
	if got := k.Render("order", "created", "id"); got != "order.created" {
		t.Fatalf("got %q", got)
	}
	k, _ = ParseRoutingKey("events.{aggregate_type}.{aggregate_id}")
	if got := k.Render("order", "created", "42"); got != "events.order.42" {
		t.Fatalf("got %q", got)
	}
	k, _ = ParseRoutingKey("fixed")
	if got := k.Render("a", "b", "c"); got != "fixed" {
		t.Fatalf("got %q", got)
	}
	for _, bad := range []string{"{aggregate_type", "{x}"} {
		if _, err := ParseRoutingKey(bad); err == nil {
			t.Fatalf("ParseRoutingKey(%q) accepted", bad)
		}
	}
}

func TestSecretFiles(t *testing.T) {
	path := t.TempDir() + "/url"
	if err := writeFile(path, "postgres://u:p@db/x\n"); err != nil {
		t.Fatal(err)
	}
	t.Setenv("RELAY_DATABASE_URL", "")
	t.Setenv("RELAY_DATABASE_URL_FILE", path)
	if err := ReadSecretFiles("RELAY_DATABASE_URL"); err != nil {
		t.Fatal(err)
	}
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if c.DatabaseURL != "postgres://u:p@db/x" {
		t.Fatalf("got %q", c.DatabaseURL)
	}
	t.Setenv("RELAY_DATABASE_URL", "postgres://other")
	if err := ReadSecretFiles("RELAY_DATABASE_URL"); err == nil {
		t.Fatal("both the variable and its _FILE were accepted")
	}
}

func BenchmarkRoutingKey(b *testing.B) {
	k, err := ParseRoutingKey("{aggregate_type}.{event_type}")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_ = k.Render("order", "created", "5f0c7c1e-0000-4000-8000-000000000001")
	}
}

func TestAMQPURLList(t *testing.T) {
	c := Config{AMQPURL: " amqp://u:s3cret@127.0.0.1:5681/ , amqp://u:s3cret@127.0.0.1:5682/,"}
	if got := c.AMQPURLs(); len(got) != 2 || got[0] != "amqp://u:s3cret@127.0.0.1:5681/" || got[1] != "amqp://u:s3cret@127.0.0.1:5682/" {
		t.Fatalf("AMQPURLs = %q", got)
	}
	if got := RedactList(c.AMQPURL); strings.Contains(got, "s3cret") || strings.Count(got, "xxxxx") != 2 {
		t.Fatalf("RedactList = %q", got)
	}
	// A comma in a password is legal unescaped in a URL's userinfo.
	comma := Config{AMQPURL: "amqp://u:s3,cr,et@127.0.0.1:5681/,amqp://u:pw@127.0.0.1:5682/"}
	if got := comma.AMQPURLs(); len(got) != 2 || got[0] != "amqp://u:s3,cr,et@127.0.0.1:5681/" {
		t.Fatalf("AMQPURLs with a comma in a password = %q", got)
	}
	if got := RedactList(comma.AMQPURL); strings.Contains(got, "s3") || strings.Contains(got, "cr") {
		t.Fatalf("RedactList with a comma in a password = %q", got)
	}
	if err := comma.Validate(); err != nil && strings.Contains(err.Error(), "RELAY_AMQP_URL") {
		t.Fatalf("a password with commas: %v", err)
	}
	for _, tc := range []struct{ url, want string }{
		{"amqp://u:s3cret@h1:5681/,http://u:s3cret@h2/", "RELAY_AMQP_URL: node URL 2 of 2 must be"},
		{"amqp://u:s3cret@h1:5681/,amqp://u:s3cret@h2/", ""},
		{",", "RELAY_AMQP_URL must be an amqp:// or amqps:// URL"},
	} {
		c := Config{AMQPURL: tc.url}
		err := c.Validate()
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		if strings.Contains(msg, "s3cret") {
			t.Errorf("%q: the error shows the password: %s", tc.url, msg)
		}
		if tc.want == "" && strings.Contains(msg, "RELAY_AMQP_URL") || tc.want != "" && !strings.Contains(msg, tc.want) {
			t.Errorf("%q: error %q, want it to say %q", tc.url, msg, tc.want)
		}
	}
}
