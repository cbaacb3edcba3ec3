package metrics

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// value is the value of the gauge or counter name, or -1 when missing.
func value(t *testing.T, m *Metrics, name string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			metric := mf.GetMetric()[0]
			if g := metric.GetGauge(); g != nil {
				return g.GetValue()
			}
			return metric.GetCounter().GetValue()
		}
	}
	return -1
}

func readyz(t *testing.T, m *Metrics) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	b, _ := io.ReadAll(rec.Body)
	return rec.Code, strings.TrimSpace(string(b))
}

// TestBrokerBlockedShowsInReadyzAndMetrics: while RabbitMQ blocks
// publishers /readyz says so with the reason, on top of the ready state;
// the gauge is 1 and the blocked time counts the running episode too; each
// change is reported once.
func TestBrokerBlockedShowsInReadyzAndMetrics(t *testing.T) {
	m := New()
	m.SetReady(true, "")
	if code, body := readyz(t, m); code != http.StatusOK || body != "streaming" {
		t.Fatalf("/readyz = %d %q", code, body)
	}
	if !m.SetBrokerBlocked(true, "low on memory") {
		t.Fatal("the start of an episode was not reported as a change")
	}
	if m.SetBrokerBlocked(true, "low on memory") {
		t.Fatal("a second notice of the same episode was reported as a change")
	}
	if code, body := readyz(t, m); code != http.StatusServiceUnavailable || body != "blocked by RabbitMQ: low on memory" {
		t.Fatalf("/readyz = %d %q while blocked", code, body)
	}
	m.SetReady(false, "shutting down")
	if _, body := readyz(t, m); body != "shutting down; blocked by RabbitMQ: low on memory" {
		t.Fatalf("/readyz = %q while blocked and shutting down", body)
	}
	m.SetReady(true, "")
	if g := value(t, m, "outbox_relay_broker_blocked"); g != 1 {
		t.Fatalf("outbox_relay_broker_blocked = %v while blocked", g)
	}
	deadline := time.Now().Add(10 * time.Second)
	for value(t, m, "outbox_relay_broker_blocked_seconds_total") <= 0 {
		if time.Now().After(deadline) {
			t.Fatal("blocked seconds stay 0 during an episode")
		}
		time.Sleep(time.Millisecond)
	}
	if !m.SetBrokerBlocked(false, "") {
		t.Fatal("the end of the episode was not reported as a change")
	}
	after := m.blockedSeconds()
	if code, body := readyz(t, m); code != http.StatusOK || body != "streaming" {
		t.Fatalf("/readyz = %d %q after the episode", code, body)
	}
	if g := value(t, m, "outbox_relay_broker_blocked"); g != 0 || after == 0 || m.blockedSeconds() != after {
		t.Fatalf("after the episode: gauge %v, blocked seconds %v then %v", g, after, m.blockedSeconds())
	}
}

// TestFailoverSlotShowsInReadyz: /readyz shows the failover slot's state,
// and an unsynced standby copy leaves a streaming relay ready.
func TestFailoverSlotShowsInReadyz(t *testing.T) {
	m := New()
	m.SetReady(true, "")
	m.SetFailoverSlot("on; standby h2:5442 NOT synced")
	if code, body := readyz(t, m); code != http.StatusOK || body != "streaming\nfailover slot: on; standby h2:5442 NOT synced" {
		t.Fatalf("/readyz = %d %q, want 200 with the failover slot's line", code, body)
	}
	m.SetReady(false, "connecting")
	if code, body := readyz(t, m); code != http.StatusServiceUnavailable || !strings.HasSuffix(body, "\nfailover slot: on; standby h2:5442 NOT synced") {
		t.Fatalf("/readyz = %d %q, want 503 still showing the failover slot", code, body)
	}
}

// labelled is the value of name{node=node}, or -1 when missing.
func labelled(t *testing.T, m *Metrics, name, node string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, metric := range mf.GetMetric() {
			for _, l := range metric.GetLabel() {
				if l.GetName() == "node" && l.GetValue() == node {
					if g := metric.GetGauge(); g != nil {
						return g.GetValue()
					}
					return metric.GetCounter().GetValue()
				}
			}
		}
	}
	return -1
}

// TestAMQPNode: every node of the list is exported at 0; the node with
// an open connection is 1 and the others 0, also when the close of the
// last connection is told after the next one opened; each connection
// counts once for its node.
func TestAMQPNode(t *testing.T) {
	m := New()
	nodes := []string{"10.0.0.1:5672", "10.0.0.2:5672", "10.0.0.3:5672"}
	m.AMQPNodes(nodes)
	want := func(gauges, conns [3]float64) {
		t.Helper()
		for i, n := range nodes {
			if g := labelled(t, m, "outbox_relay_amqp_node", n); g != gauges[i] {
				t.Errorf("outbox_relay_amqp_node{node=%q} = %v, want %v", n, g, gauges[i])
			}
			if c := labelled(t, m, "outbox_relay_amqp_connections_total", n); c != conns[i] {
				t.Errorf("outbox_relay_amqp_connections_total{node=%q} = %v, want %v", n, c, conns[i])
			}
		}
	}
	want([3]float64{0, 0, 0}, [3]float64{0, 0, 0})
	m.AMQPConnection(nodes[1], true)
	want([3]float64{0, 1, 0}, [3]float64{0, 1, 0})
	m.AMQPConnection(nodes[1], false)
	want([3]float64{0, 0, 0}, [3]float64{0, 1, 0})
	m.AMQPConnection(nodes[2], true)
	m.AMQPConnection(nodes[0], true)
	m.AMQPConnection(nodes[2], false) // told late
	want([3]float64{1, 0, 0}, [3]float64{1, 1, 1})
	m.AMQPConnection(nodes[2], false) // a second close changes nothing
	want([3]float64{1, 0, 0}, [3]float64{1, 1, 1})
}
