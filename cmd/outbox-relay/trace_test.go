package main

import (
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	coltrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// collector is a fake OTLP/HTTP collector: it keeps the spans POSTed to
// /v1/traces and the Authorization header they came with.
type collector struct {
	mu    sync.Mutex
	spans []*tracepb.Span
	auth  []string
}

func (c *collector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var req coltrace.ExportTraceServiceRequest
	if r.URL.Path != "/v1/traces" || proto.Unmarshal(body, &req) != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	c.mu.Lock()
	c.auth = append(c.auth, r.Header.Get("Authorization"))
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			c.spans = append(c.spans, ss.GetSpans()...)
		}
	}
	c.mu.Unlock()
	b, _ := proto.Marshal(&coltrace.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(b)
}

// span returns the span of message id, if exported.
func (c *collector) span(id string) (*tracepb.Span, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.spans {
		for _, a := range s.GetAttributes() {
			if a.GetKey() == "messaging.message.id" && a.GetValue().GetStringValue() == id {
				return s, append([]string(nil), c.auth...)
			}
		}
	}
	return nil, nil
}

// TestRunTracing: without an OTLP endpoint run says tracing is off; with
// one (credentials in it and in OTEL_EXPORTER_OTLP_HEADERS) it says where,
// never the credentials, and exports the span of a published event, linked
// to the trace context of its row, with the configured headers.
func TestRunTracing(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)
	newConsumer(t, e.amqpURL, e.exchange)
	db := e.conn(t)
	off := with(e.vars(), "OTEL_EXPORTER_OTLP_ENDPOINT", "\x00", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "\x00")

	p := start(t, off, "run")
	if !p.waitOutput(`"message":"streaming"`, 30*time.Second) || !strings.Contains(p.all.String(), `"message":"tracing off`) {
		t.Fatalf("no streaming and tracing off lines within 30s:\n%s", p.all.String())
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}

	col := &collector{}
	srv := httptest.NewServer(col)
	defer srv.Close()
	endpoint := strings.Replace(srv.URL, "http://", "http://otlpuser:"+secret+"@", 1)
	p = start(t, with(off, "OTEL_EXPORTER_OTLP_ENDPOINT", endpoint, "OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20hdr"+secret,
		"OTEL_BSP_SCHEDULE_DELAY", "100"), "run")
	if !p.waitOutput(`"message":"streaming"`, 30*time.Second) {
		t.Fatalf("the relay did not start streaming within 30s")
	}
	if line := lineWith(p.all.String(), `"message":"tracing on`); !strings.Contains(line, `"endpoint":"`+srv.URL+`"`) ||
		!strings.Contains(line, `"protocol":"http/protobuf"`) {
		t.Errorf("the tracing on line does not give the endpoint %s and protocol: %q", srv.URL, line)
	}
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	var id string
	if err := db.QueryRow(t.Context(), `INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, traceparent)
		VALUES (gen_random_uuid(), 'customer', gen_random_uuid(), 'updated', '{}', '00-`+traceID+`-00f067aa0ba902b7-01')
		RETURNING id::text`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	var span *tracepb.Span
	var auth []string
	if !eventually(20*time.Second, func() bool { span, auth = col.span(id); return span != nil }) {
		t.Fatalf("no span for %s exported within 20s", id)
	}
	if l := span.GetLinks(); len(l) != 1 || string(l[0].GetTraceId()) != string(mustHex(t, traceID)) {
		t.Errorf("span links %v, want one to trace %s", l, traceID)
	}
	if span.GetName() != e.exchange+" publish" || span.GetKind() != tracepb.Span_SPAN_KIND_PRODUCER {
		t.Errorf("span %q kind %v", span.GetName(), span.GetKind())
	}
	if len(auth) == 0 || auth[0] != "Bearer hdr"+secret {
		t.Errorf("collector got Authorization %q, want OTEL_EXPORTER_OTLP_HEADERS's", auth)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}
	if out := p.all.String(); strings.Contains(out, secret) {
		t.Errorf("output contains a credential of the OTLP endpoint or headers:\n%s", out)
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func lineWith(out, substr string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, substr) {
			return l
		}
	}
	return ""
}
