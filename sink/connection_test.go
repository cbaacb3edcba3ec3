package sink

import (
	"sync"
	"testing"
	"time"
)

// TestRabbitMQOnConnection: a dial tells OnConnection its node's host:port
// (never the URL) once up, and the close of the connection after.
func TestRabbitMQOnConnection(t *testing.T) {
	rt := newRabbitTest(t)
	var mu sync.Mutex
	var events []string
	rt.cfg.OnConnection = func(node string, up bool) {
		mu.Lock()
		defer mu.Unlock()
		state := "down"
		if up {
			state = "up"
		}
		events = append(events, node+" "+state)
	}
	r := rt.dial(t)
	node := NodeAddr(rt.cfg.URL)
	got := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), events...)
	}
	if e := got(); len(e) != 1 || e[0] != node+" up" {
		t.Fatalf("after the dial: %q, want [%s up]", e, node)
	}
	r.Close()
	deadline := time.Now().Add(10 * time.Second)
	for len(got()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("after Close: %q, no close told", got())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if e := got(); len(e) != 2 || e[1] != node+" down" {
		t.Fatalf("after Close: %q, want [%s up, %s down]", e, node, node)
	}
}
