package main

import (
	"strings"
	"testing"
	"time"
)

// Usage errors exit 2 before anything connects.
func TestPruneUsageErrors(t *testing.T) {
	vars := map[string]string{"RELAY_DATABASE_URL": "postgres://relay:" + secret + "@127.0.0.1:1/outbox?sslmode=disable"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"prune"}, "--older-than is required"},
		{[]string{"prune", "--older-than", "-1h"}, "--older-than is required and must be positive"},
		{[]string{"prune", "--older-than", "a week"}, "invalid value"},
		{[]string{"prune", "--older-than", "1h", "--batch-size", "0"}, "--batch-size must be positive"},
		{[]string{"prune", "--older-than", "1h", "now"}, `unexpected argument "now"`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, all, code := runBin(t, vars, 30*time.Second, tc.args...)
			if code != 2 || !strings.Contains(all, tc.want) {
				t.Fatalf("exit %d, output:\n%s\nwant exit 2 and %q", code, all, tc.want)
			}
		})
	}
}
