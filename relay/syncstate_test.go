package relay

import "testing"

// TestNamesRelay: which synchronous_standby_names values can match the
// relay's walsender, for the fallback when sync_state cannot be read.
func TestNamesRelay(t *testing.T) {
	for _, c := range []struct {
		setting string
		want    bool
	}{
		{"", false},
		{"*", true},
		{"FIRST 1 (*)", true},
		{"ANY 2 (s1, *)", true},
		{"outbox-relay", true},
		{`FIRST 1 ("outbox-relay", s1)`, true},
		{"ANY 1 (OUTBOX-RELAY)", true},
		{"FIRST 1 (standby1)", false},
		{"s1, s2", false},
		{"outbox-relay-2", false},
	} {
		if got := namesRelay(c.setting, "outbox-relay"); got != c.want {
			t.Errorf("namesRelay(%q) = %v, want %v", c.setting, got, c.want)
		}
	}
}

// TestSyncCandidate: commits may wait for the relay in these states only.
func TestSyncCandidate(t *testing.T) {
	for state, want := range map[string]bool{
		syncAsync: false, syncPotential: true, syncSync: true, syncQuorum: true, syncUnknown: true,
	} {
		if got := syncCandidate(state); got != want {
			t.Errorf("syncCandidate(%q) = %v, want %v", state, got, want)
		}
	}
}
