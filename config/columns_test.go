package config

import (
	"strings"
	"testing"
)

func TestHeaderColumns(t *testing.T) {
	c := &Config{HeaderColumns: " tenant_id, schema_version ,Region$2"}
	cols, err := c.Columns()
	if err != nil || strings.Join(cols.Headers, ",") != "tenant_id,schema_version,Region$2" {
		t.Fatalf("Columns() = %v, %v", cols.Headers, err)
	}
	for spec, want := range map[string]string{
		"tenant,Tenant":         "listed twice",
		"a,a":                   "listed twice",
		"payload":               "already the payload column",
		"traceparent":           "already the traceparent column",
		"published_at":          "the relay's own column",
		"relay_seq":             "the relay's own column",
		"CC":                    "a header the relay sets itself",
		"bcc":                   "a header the relay sets itself",
		"Tombstone":             "a header the relay sets itself",
		"cloudEvents_x":         "CloudEvents header prefix",
		"ce_id":                 "CloudEvents header prefix",
		"x-tenant":              "not a plain column name",
		"tenant id":             "not a plain column name",
		"":                      "",
		strings.Repeat("a", 64): "not a plain column name",
	} {
		_, err := (&Config{HeaderColumns: spec}).Columns()
		if want == "" {
			if err != nil {
				t.Errorf("%q: %v", spec, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) || !strings.HasPrefix(err.Error(), "RELAY_HEADER_COLUMNS") {
			t.Errorf("%q: err = %v, want it to say %s", spec, err, want)
		}
	}
	if _, err := (&Config{ColumnsSpec: "occurred_at=published_at"}).Columns(); err == nil ||
		!strings.HasPrefix(err.Error(), "RELAY_COLUMNS") || !strings.Contains(err.Error(), "keeps that column itself") {
		t.Errorf("occurred_at=published_at: err = %v", err)
	}
}

func TestCloudEventsSourceAttr(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{DatabaseURL: "postgres://u:secret@db:5432/app?sslmode=disable", Table: "public.outbox_events"}, "outbox-relay:app/public.outbox_events"},
		{Config{DatabaseURL: "postgres://db/my%20db", Table: "outbox"}, "outbox-relay:my%20db/public.outbox"},
		{Config{DatabaseURL: "postgres://db/app", Table: "x", CloudEventsSource: "https://example.com/orders"}, "https://example.com/orders"},
	} {
		if got := c.cfg.CloudEventsSourceAttr(); got != c.want {
			t.Errorf("%s %s: %q, want %q", Redact(c.cfg.DatabaseURL), c.cfg.Table, got, c.want)
		}
	}
}
