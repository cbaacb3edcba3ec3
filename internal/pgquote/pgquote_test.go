package pgquote

import "testing"

func TestLiteral(t *testing.T) {
	for in, want := range map[string]string{
		"":             "''",
		"slot":         "'slot'",
		"o'brien":      "'o''brien'",
		`a\b`:          `'a\b'`,
		"''":           "''''''",
		"\"outbox\"":   `'"outbox"'`,
		"snap-1-2-3'x": "'snap-1-2-3''x'",
	} {
		if got := Literal(in); got != want {
			t.Errorf("Literal(%q) = %s, want %s", in, got, want)
		}
	}
}
