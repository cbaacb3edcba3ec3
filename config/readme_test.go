package config

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

// TestEveryVariableIsDocumented keeps the README's configuration table true:
// every RELAY_* variable the relay reads appears in it with its default.
func TestEveryVariableIsDocumented(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	typ := reflect.TypeOf(Config{})
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("env"), ",")
		if name == "" {
			continue
		}
		if !strings.Contains(readme, "`"+name+"`") {
			t.Errorf("%s is not documented in README.md", name)
			continue
		}
		if def, ok := f.Tag.Lookup("envDefault"); ok {
			line := lineWith(readme, "`"+name+"`")
			if !strings.Contains(line, "`"+def+"`") {
				t.Errorf("README's line for %s does not give its default %q: %s", name, def, line)
			}
		}
	}
}

func lineWith(s, sub string) string {
	// The configuration table's rows name the variable in the first cell.
	for _, l := range strings.Split(s, "\n") {
		cells := strings.Split(l, "|")
		if len(cells) > 2 && strings.HasPrefix(strings.TrimSpace(cells[1]), "`RELAY_") && strings.Contains(cells[1], sub) {
			return l
		}
	}
	return ""
}
