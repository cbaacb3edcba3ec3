package tracing

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	coltrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"
)

func clearEnv(t *testing.T) {
	for _, k := range []string{EnvEndpoint, EnvTracesEndpoint, EnvProtocol, EnvTracesProtocol, EnvSDKDisabled,
		"OTEL_EXPORTER_OTLP_HEADERS", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"} {
		t.Setenv(k, "")
	}
}

// countExporters counts the exporters Setup builds.
func countExporters(t *testing.T) *int {
	n := new(int)
	orig := newExporter
	newExporter = func(ctx context.Context, protocol string) (sdktrace.SpanExporter, error) {
		*n++
		return orig(ctx, protocol)
	}
	t.Cleanup(func() { newExporter = orig })
	return n
}

// TestSetupOffWithoutEndpoint: no endpoint (or OTEL_SDK_DISABLED=true):
// no tracer, no exporter, no provider.
func TestSetupOffWithoutEndpoint(t *testing.T) {
	clearEnv(t)
	built := countExporters(t)
	t.Setenv(EnvProtocol, "grpc") // a protocol alone turns nothing on
	tr, err := Setup(context.Background(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Enabled() || tr.Tracer != nil || tr.tp != nil || *built != 0 {
		t.Fatalf("without an endpoint: tracer %v, provider %v, %d exporters", tr.Tracer, tr.tp, *built)
	}
	if err := tr.Shutdown(time.Second); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvEndpoint, "http://127.0.0.1:1")
	t.Setenv(EnvSDKDisabled, "true")
	if tr, err = Setup(context.Background(), Config{}); err != nil || tr.Enabled() || *built != 0 {
		t.Fatalf("OTEL_SDK_DISABLED=true: enabled %v, %d exporters, %v", tr.Enabled(), *built, err)
	}
}

// TestSetupExportsOverHTTP: with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a
// collector, a span is POSTed to /v1/traces as OTLP protobuf, with its
// link, while the relay runs (not only at shutdown).
func TestSetupExportsOverHTTP(t *testing.T) {
	clearEnv(t)
	built := countExporters(t)
	got := make(chan *coltrace.ExportTraceServiceRequest, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" || r.Header.Get("Content-Type") != "application/x-protobuf" {
			t.Errorf("%s %s (%s), want a protobuf POST to /v1/traces", r.Method, r.URL.Path, r.Header.Get("Content-Type"))
			w.WriteHeader(http.StatusNotFound)
			return
		}
		var req coltrace.ExportTraceServiceRequest
		if err := proto.Unmarshal(body, &req); err != nil {
			t.Errorf("body: %v", err)
		}
		got <- &req
		w.Header().Set("Content-Type", "application/x-protobuf")
		b, _ := proto.Marshal(&coltrace.ExportTraceServiceResponse{})
		_, _ = w.Write(b)
	}))
	defer srv.Close()
	t.Setenv(EnvEndpoint, srv.URL)
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "50")

	tr, err := Setup(context.Background(), Config{ServiceVersion: "v-test"})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown(5 * time.Second) //nolint:errcheck // checked below
	if !tr.Enabled() || *built != 1 || tr.Protocol != "http/protobuf" || tr.Endpoint != srv.URL {
		t.Fatalf("enabled %v, %d exporters, protocol %q, endpoint %q", tr.Enabled(), *built, tr.Protocol, tr.Endpoint)
	}
	producer := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{1, 2, 3}, SpanID: trace.SpanID{4, 5, 6}, TraceFlags: trace.FlagsSampled, Remote: true})
	_, span := tr.Tracer.Start(context.Background(), "ex publish", trace.WithLinks(trace.Link{SpanContext: producer}))
	span.End()

	select {
	case req := <-got:
		rs := req.GetResourceSpans()
		if len(rs) != 1 || len(rs[0].GetScopeSpans()) != 1 || len(rs[0].GetScopeSpans()[0].GetSpans()) != 1 {
			t.Fatalf("export %v, want one span", req)
		}
		var service string
		for _, a := range rs[0].GetResource().GetAttributes() {
			if a.GetKey() == "service.name" {
				service = a.GetValue().GetStringValue()
			}
		}
		ss := rs[0].GetScopeSpans()[0]
		s := ss.GetSpans()[0]
		if service != "outbox-relay" || ss.GetScope().GetName() != ScopeName || s.GetName() != "ex publish" ||
			len(s.GetLinks()) != 1 || trace.TraceID(s.GetLinks()[0].GetTraceId()) != producer.TraceID() || trace.SpanID(s.GetLinks()[0].GetSpanId()) != producer.SpanID() {
			t.Fatalf("exported service %q scope %q span %q links %v", service, ss.GetScope().GetName(), s.GetName(), s.GetLinks())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no span POSTed to /v1/traces within 10s")
	}
	if err := tr.Shutdown(5 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestSetupProtocols: grpc builds the grpc exporter (it connects lazily),
// an unknown protocol is refused.
func TestSetupProtocols(t *testing.T) {
	clearEnv(t)
	t.Setenv(EnvTracesEndpoint, "http://127.0.0.1:1")
	t.Setenv(EnvProtocol, "grpc")
	tr, err := Setup(context.Background(), Config{})
	if err != nil || !tr.Enabled() || tr.Protocol != "grpc" {
		t.Fatalf("grpc: %+v, %v", tr, err)
	}
	if err := tr.Shutdown(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvTracesProtocol, "thrift")
	if _, err := Setup(context.Background(), Config{}); err == nil || !strings.Contains(err.Error(), "thrift") {
		t.Fatalf("unknown protocol: %v", err)
	}
}

// TestSafeEndpoint: the log shows scheme and host, never credentials,
// paths or queries.
func TestSafeEndpoint(t *testing.T) {
	for in, want := range map[string]string{
		"https://user:secret@collector.example:4318/v1/traces?token=x": "https://collector.example:4318",
		"http://127.0.0.1:4318":    "http://127.0.0.1:4318",
		"collector:4317":           "collector:4317",
		"127.0.0.1:4317":           "127.0.0.1:4317",
		"user:secret@collector:43": "(unparsed)",
	} {
		if got := safeEndpoint(in); got != want {
			t.Errorf("safeEndpoint(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestErrorsRateLimited: the error handler passes one error a period and
// counts the rest.
func TestErrorsRateLimited(t *testing.T) {
	var got []int
	h := &limitedHandler{f: func(_ error, n int) { got = append(got, n) }, every: 50 * time.Millisecond}
	for range 5 {
		h.Handle(errors.New("export failed"))
	}
	time.Sleep(60 * time.Millisecond)
	h.Handle(errors.New("export failed"))
	if len(got) != 2 || got[0] != 0 || got[1] != 4 {
		t.Fatalf("handler called with %v, want [0 4]", got)
	}
}
