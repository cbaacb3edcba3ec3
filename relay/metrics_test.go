package relay

import (
	"bufio"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrape reads one sample from /metrics.
func scrape(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	must(t, err)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			must(t, err)
			return f
		}
	}
	t.Fatalf("%s not in /metrics", name)
	return 0
}

func status(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	must(t, err)
	defer resp.Body.Close()
	var b strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		b.WriteString(sc.Text())
	}
	return resp.StatusCode, b.String()
}

// TestMetricsAndHealth: counters move when events flow, the acknowledged
// LSN follows the slot, /healthz answers and /readyz says streaming.
func TestMetricsAndHealth(t *testing.T) {
	e := newEnv(t)
	r := e.start(nil)
	srv := httptest.NewServer(r.metrics.Handler())
	defer srv.Close()
	if code, _ := status(t, srv.URL+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d", code)
	}
	r.waitStreaming(t)
	if code, body := status(t, srv.URL+"/readyz"); code != http.StatusOK || body != "streaming" {
		t.Fatalf("/readyz = %d %q while streaming", code, body)
	}
	before := scrape(t, srv.URL, "outbox_relay_events_published_total")
	ackedBefore := scrape(t, srv.URL, "outbox_relay_acknowledged_lsn")
	txBefore := scrape(t, srv.URL, "outbox_relay_stream_delay_seconds_count")
	var evs []event
	for i := 0; i < 7; i++ {
		evs = append(evs, newEvent("order", "created", `{}`))
	}
	e.insertTx(evs, true, nil)
	e.waitReceived(7, 20*time.Second)
	waitFor(t, 10*time.Second, "the counter to move", func() bool {
		return scrape(t, srv.URL, "outbox_relay_events_published_total") == before+7
	})
	waitFor(t, 10*time.Second, "the acknowledged LSN to move", func() bool {
		return scrape(t, srv.URL, "outbox_relay_acknowledged_lsn") > ackedBefore
	})
	if n := scrape(t, srv.URL, "outbox_relay_publish_confirm_seconds_count"); n < 7 {
		t.Fatalf("confirm histogram has %v observations, want at least 7", n)
	}
	if n := scrape(t, srv.URL, "outbox_relay_event_delivery_seconds_count"); n < 7 {
		t.Fatalf("delivery histogram has %v observations, want at least 7", n)
	}
	// One observation per transaction with events, not per event; the
	// server's clock is this machine's, so the delay is small.
	if n := scrape(t, srv.URL, "outbox_relay_stream_delay_seconds_count"); n != txBefore+1 {
		t.Fatalf("stream delay histogram has %v new observations for one transaction, want 1", n-txBefore)
	}
	if d := scrape(t, srv.URL, "outbox_relay_stream_delay_seconds_sum"); d < 0 || d > 10 {
		t.Fatalf("stream delay sum = %v s for one transaction", d)
	}
	r.stop(t)
	if code, body := status(t, srv.URL+"/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz = %d %q after stop", code, body)
	}
}
