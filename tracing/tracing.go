// Package tracing sets up the relay's own spans, exported over OTLP, and
// nothing when tracing is not asked for.
//
// Tracing is on when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
// OTEL_EXPORTER_OTLP_ENDPOINT is set (and OTEL_SDK_DISABLED is not true).
// The exporter then reads the rest of the standard OTLP variables itself
// (headers, TLS, timeout, compression); OTEL_EXPORTER_OTLP_PROTOCOL (or
// OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) picks http/protobuf (the default),
// http/json or grpc. Spans go through the SDK's batch processor
// (OTEL_BSP_*), sampled by OTEL_TRACES_SAMPLER (always on by default), with
// the resource service.name=outbox-relay unless OTEL_SERVICE_NAME or
// OTEL_RESOURCE_ATTRIBUTES say otherwise.
//
// Without those variables Setup creates no exporter and no tracer
// provider: the relay gets a nil Tracer and starts no spans.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// The variables Setup reads itself.
const (
	EnvEndpoint       = "OTEL_EXPORTER_OTLP_ENDPOINT"
	EnvTracesEndpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
	EnvProtocol       = "OTEL_EXPORTER_OTLP_PROTOCOL"
	EnvTracesProtocol = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
	EnvSDKDisabled    = "OTEL_SDK_DISABLED"
)

// ScopeName is the instrumentation scope of the relay's spans.
const ScopeName = "github.com/outbox-relay/outbox-relay/relay"

// Config is what Setup needs besides the environment.
type Config struct {
	// ServiceVersion is the resource's service.version.
	ServiceVersion string
	// OnError, if set, receives the SDK's errors (a failed export, say),
	// at most one a minute, with how many were left out since the last.
	// It is installed as OpenTelemetry's global error handler.
	OnError func(err error, suppressed int)
}

// Tracing is the relay's tracer and what it exports to.
type Tracing struct {
	// Tracer starts the relay's spans; nil when tracing is off.
	Tracer trace.Tracer
	// Endpoint is where spans go, scheme and host only (no credentials,
	// path or query), for the log; Protocol the OTLP protocol.
	Endpoint, Protocol string

	tp *sdktrace.TracerProvider
}

// Enabled reports whether spans are exported.
func (t *Tracing) Enabled() bool { return t != nil && t.Tracer != nil }

// newExporter builds the exporter; a variable so that a test can see it is
// not called.
var newExporter = func(ctx context.Context, protocol string) (sdktrace.SpanExporter, error) {
	if protocol == "grpc" {
		return otlptracegrpc.New(ctx)
	}
	return otlptracehttp.New(ctx) // reads the protocol, http/protobuf or http/json, itself
}

// Setup reads the environment and, when an OTLP endpoint is set, builds the
// exporter and the tracer provider. It never touches the network: the
// exporter connects when it first exports.
func Setup(ctx context.Context, cfg Config) (*Tracing, error) {
	endpoint := os.Getenv(EnvTracesEndpoint)
	if endpoint == "" {
		endpoint = os.Getenv(EnvEndpoint)
	}
	if endpoint == "" || strings.EqualFold(strings.TrimSpace(os.Getenv(EnvSDKDisabled)), "true") {
		return &Tracing{}, nil
	}
	protocol := os.Getenv(EnvTracesProtocol)
	if protocol == "" {
		protocol = os.Getenv(EnvProtocol)
	}
	switch protocol {
	case "":
		protocol = "http/protobuf"
	case "http/protobuf", "http/json", "grpc":
	default:
		return nil, fmt.Errorf("%s=%q: the relay exports spans with grpc, http/protobuf or http/json", EnvProtocol, protocol)
	}
	exp, err := newExporter(ctx, protocol)
	if err != nil {
		return nil, fmt.Errorf("OTLP trace exporter (%s): %w", protocol, err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", "outbox-relay"), attribute.String("service.version", cfg.ServiceVersion)),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil {
		_ = exp.Shutdown(ctx)
		return nil, fmt.Errorf("OpenTelemetry resource (OTEL_RESOURCE_ATTRIBUTES): %w", err)
	}
	if cfg.OnError != nil {
		otel.SetErrorHandler(&limitedHandler{f: cfg.OnError, every: time.Minute})
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return &Tracing{
		Tracer:   tp.Tracer(ScopeName, trace.WithInstrumentationVersion(cfg.ServiceVersion)),
		Endpoint: safeEndpoint(endpoint),
		Protocol: protocol,
		tp:       tp,
	}, nil
}

// Shutdown exports the spans still queued and stops the exporter, waiting
// at most timeout. Without tracing it does nothing.
func (t *Tracing) Shutdown(timeout time.Duration) error {
	if t == nil || t.tp == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := t.tp.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("spans not exported within %s: %w", timeout, err)
	}
	return err
}

// safeEndpoint is endpoint's scheme and host: what a log may show.
func safeEndpoint(endpoint string) string {
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		// grpc also takes host:port without a scheme; anything else is
		// not shown, in case it holds a secret.
		if strings.ContainsAny(endpoint, "@/?#") {
			return "(unparsed)"
		}
		return endpoint
	}
	return u.Scheme + "://" + u.Host
}

// limitedHandler passes on at most one error every `every`.
type limitedHandler struct {
	f     func(error, int)
	every time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (h *limitedHandler) Handle(err error) {
	h.mu.Lock()
	now := time.Now()
	if !h.last.IsZero() && now.Sub(h.last) < h.every {
		h.suppressed++
		h.mu.Unlock()
		return
	}
	n := h.suppressed
	h.last, h.suppressed = now, 0
	h.mu.Unlock()
	h.f(err, n)
}
