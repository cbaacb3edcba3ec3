package sink

import (
	"strings"
	"testing"
	"time"
)

// TestTraceHeaders: the producer's trace context travels as the headers
// traceparent and tracestate on both sinks, only when set, and Reject's
// frame size shortcut counts them.
func TestTraceHeaders(t *testing.T) {
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	at := time.Date(2024, 1, 2, 3, 4, 5, 6, time.UTC)
	for _, m := range []*Message{
		{ID: "a", Type: "t", OccurredAt: at, Traceparent: tp},
		{ID: "b", Type: "t", OccurredAt: at, Traceparent: tp, Tracestate: strings.Repeat("k=v,", 127) + "k=v"},
		{ID: "c", Type: "t", OccurredAt: at},
	} {
		r, n := &RabbitMQ{}, &NATS{}
		pub := r.publishing(m)
		if got, want := r.messageHeaderFrameSize(m), headerFrameSize(&pub); got != want {
			t.Errorf("%s: messageHeaderFrameSize = %d, headerFrameSize(publishing) = %d", m.ID, got, want)
		}
		msg := n.natsMessage("s", m)
		for name, want := range map[string]string{"traceparent": m.Traceparent, "tracestate": m.Tracestate} {
			got, ok := pub.Headers[name]
			if want == "" && ok || want != "" && got != want {
				t.Errorf("%s: AMQP header %s = %v (present %v), want %q", m.ID, name, got, ok, want)
			}
			vs, ok := msg.Header[name]
			if want == "" && ok || want != "" && (len(vs) != 1 || vs[0] != want) {
				t.Errorf("%s: NATS header %s = %v, want %q", m.ID, name, vs, want)
			}
		}
	}
}
