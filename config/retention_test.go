package config

import (
	"strings"
	"testing"
	"time"
)

func TestRetentionAndStatusPoll(t *testing.T) {
	t.Setenv("RELAY_DATABASE_URL", "postgres://db/x")
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if c.Retention != 0 || c.RetentionInterval != time.Hour || c.StatusPollInterval != 0 {
		t.Fatalf("defaults: retention=%s interval=%s poll=%s, want 0s 1h 0s", c.Retention, c.RetentionInterval, c.StatusPollInterval)
	}

	t.Setenv("RELAY_RETENTION", "168h")
	t.Setenv("RELAY_RETENTION_INTERVAL", "10m")
	t.Setenv("RELAY_STATUS_POLL_INTERVAL", "30s")
	if c, err = Load(); err != nil {
		t.Fatal(err)
	}
	if c.Retention != 168*time.Hour || c.RetentionInterval != 10*time.Minute || c.StatusPollInterval != 30*time.Second {
		t.Fatalf("parsed: %s %s %s", c.Retention, c.RetentionInterval, c.StatusPollInterval)
	}

	for _, tc := range []struct{ name, value string }{
		{"RELAY_RETENTION", "-1h"},
		{"RELAY_RETENTION", "a week"},
		{"RELAY_RETENTION_INTERVAL", "0s"},
		{"RELAY_STATUS_POLL_INTERVAL", "-5s"},
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			t.Setenv(tc.name, tc.value)
			_, err := Load()
			if err == nil || !strings.Contains(err.Error(), tc.name) {
				t.Fatalf("Load() = %v, want an error naming %s", err, tc.name)
			}
		})
	}
}
