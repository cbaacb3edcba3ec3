package sink

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/cloudevents/sdk-go/v2/binding/spec"
	"github.com/cloudevents/sdk-go/v2/event"

	"github.com/outbox-relay/outbox-relay/decoder"
)

const testCESource = "outbox-relay:shop/public.outbox_events"

// ceMessages are the events the CloudEvents tests publish: with header
// columns and trace context, without them (a NULL header column is absent
// from Headers), a tombstone, and values a header must encode (spaces,
// quotes, percent, multibyte UTF-8).
func ceMessages(key string) []*Message {
	full := testMessage("00000000-0000-4000-8000-0000000000c1", key, `{"total":12.5}`)
	full.Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	full.Tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
	full.Headers = []decoder.Header{{Name: "tenant", Value: "acme"}, {Name: "note", Value: "café 100% \"ok\""},
		{Name: "empty", Value: ""}, {Name: "ref$1", Value: "x"}}

	bare := testMessage("00000000-0000-4000-8000-0000000000c2", key, `[1,2]`)
	bare.Type = "order paid, 100% \"real\" ✓"
	bare.AggregateID = "Åsa/ 42"
	bare.OccurredAt = time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC) // whole seconds

	tomb := testMessage("00000000-0000-4000-8000-0000000000c3", key, "")
	tomb.Body, tomb.Tombstone = nil, true
	tomb.Tracestate = "a=b"
	tomb.Headers = []decoder.Header{{Name: "note", Value: "deleted"}} // tenant was NULL

	noSubject := testMessage("00000000-0000-4000-8000-0000000000c4", key, `{}`)
	noSubject.AggregateID = ""
	return []*Message{full, bare, tomb, noSubject}
}

// ceEvent rebuilds a CloudEvent from a received message's attributes as a
// consumer does, with the SDK's binding rules: the prefixed specversion
// picks the version, the other prefixed attributes set the context (or an
// extension), datacontenttype is given, the body is the data.
func ceEvent(t *testing.T, prefix string, attrs map[string]string, dataContentType string, body []byte) event.Event {
	t.Helper()
	vs := spec.WithPrefix(prefix)
	sv := vs.Version(attrs[vs.PrefixedSpecVersionName()])
	if sv == nil {
		t.Fatalf("no known %s in %v", vs.PrefixedSpecVersionName(), attrs)
	}
	e := event.Event{Context: sv.NewContext()}
	for k, v := range attrs {
		if !strings.HasPrefix(k, prefix) || k == vs.PrefixedSpecVersionName() {
			continue
		}
		if err := sv.SetAttribute(e.Context, k, v); err != nil {
			t.Fatalf("attribute %s = %q: %v", k, v, err)
		}
	}
	if dataContentType != "" {
		if err := e.Context.SetDataContentType(dataContentType); err != nil {
			t.Fatal(err)
		}
	}
	if len(body) > 0 {
		e.DataEncoded = body
	}
	return e
}

// checkCloudEvent: e is valid and every attribute is what m says.
func checkCloudEvent(t *testing.T, e event.Event, m *Message) {
	t.Helper()
	if err := e.Validate(); err != nil {
		t.Fatalf("%s: invalid CloudEvent: %v", m.ID, err)
	}
	wantType := "application/json"
	if m.Tombstone {
		wantType = ""
	}
	if e.SpecVersion() != "1.0" || e.ID() != m.ID || e.Type() != m.Type || e.Source() != testCESource ||
		e.Subject() != m.AggregateID || !e.Time().Equal(m.OccurredAt) || e.DataContentType() != wantType ||
		!bytes.Equal(e.Data(), m.Body) || len(e.Extensions()) != 0 {
		t.Fatalf("%s: CloudEvent differs from the message:\n%s", m.ID, e)
	}
}

// wantHeaders is the set of header names the sink sends for m besides the
// CloudEvents attributes: the contract's, m's header columns and, when
// set, the trace context and tombstone.
func wantHeaders(m *Message, contract ...string) []string {
	names := append([]string{"aggregate_type", "aggregate_id", "occurred_at"}, contract...)
	for _, h := range m.Headers {
		names = append(names, h.Name)
	}
	if m.Traceparent != "" {
		names = append(names, "traceparent")
	}
	if m.Tracestate != "" {
		names = append(names, "tracestate")
	}
	if m.Tombstone {
		names = append(names, "tombstone")
	}
	sort.Strings(names)
	return names
}

// TestRabbitMQCloudEvents: with CloudEvents on, each message consumed from
// RabbitMQ rebuilds (cloudEvents_ headers, content_type, body) into a valid
// CloudEvent equal to the event published; header columns, trace context
// and tombstone arrive as headers, and nothing else does. With it off,
// there is no cloudEvents_ header.
func TestRabbitMQCloudEvents(t *testing.T) {
	for _, on := range []bool{true, false} {
		t.Run(fmt.Sprintf("CloudEvents=%v", on), func(t *testing.T) {
			rt := newRabbitTest(t)
			rt.cfg.CloudEvents, rt.cfg.CloudEventsSource = on, testCESource
			r := rt.dial(t)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for _, m := range ceMessages("order.created") {
				if reason := r.Reject(m); reason != "" {
					t.Fatalf("%s: Reject = %q", m.ID, reason)
				}
				p, err := r.Publish(ctx, m)
				if err != nil {
					t.Fatal(err)
				}
				if res, err := p.Wait(ctx); err != nil || res.Outcome != Acked {
					t.Fatalf("%s: %v %v", m.ID, res, err)
				}
				d, ok := rt.get(t, rt.queue)
				if !ok {
					t.Fatalf("%s: not in the queue", m.ID)
				}
				attrs := map[string]string{}
				var names []string
				for k, v := range d.Headers {
					if strings.HasPrefix(k, "cloudEvents_") {
						s, ok := v.(string)
						if !ok {
							t.Fatalf("%s: %s is a %T, want a string", m.ID, k, v)
						}
						attrs[k] = s
						continue
					}
					names = append(names, k)
				}
				sort.Strings(names)
				if want := wantHeaders(m); fmt.Sprint(names) != fmt.Sprint(want) {
					t.Fatalf("%s: headers %v, want %v", m.ID, names, want)
				}
				for _, h := range m.Headers {
					if d.Headers[h.Name] != h.Value {
						t.Fatalf("%s: header column %s = %q, want %q", m.ID, h.Name, d.Headers[h.Name], h.Value)
					}
				}
				if d.Headers["traceparent"] != nil && d.Headers["traceparent"] != m.Traceparent ||
					d.Headers["tracestate"] != nil && d.Headers["tracestate"] != m.Tracestate {
					t.Fatalf("%s: trace headers %v %v", m.ID, d.Headers["traceparent"], d.Headers["tracestate"])
				}
				if m.Tombstone && (d.Headers["tombstone"] != true || d.ContentType != "" || len(d.Body) != 0) {
					t.Fatalf("tombstone: header %#v, content_type %q, body %d bytes", d.Headers["tombstone"], d.ContentType, len(d.Body))
				}
				if !m.Tombstone && d.ContentType != "application/json" {
					t.Fatalf("%s: content_type %q", m.ID, d.ContentType)
				}
				if !on {
					if len(attrs) != 0 {
						t.Fatalf("%s: CloudEvents off, but %v", m.ID, attrs)
					}
					continue
				}
				if want := map[bool]int{true: 5, false: 6}[m.AggregateID == ""]; len(attrs) != want {
					t.Fatalf("%s: %d cloudEvents_ headers, want %d: %v", m.ID, len(attrs), want, attrs)
				}
				checkCloudEvent(t, ceEvent(t, "cloudEvents_", attrs, d.ContentType, d.Body), m)
			}
		})
	}
}

// TestNATSCloudEvents: the same for NATS: ce- headers, percent-decoded as
// the binding says (and no value needing it sent raw), ce-datacontenttype,
// and the body.
func TestNATSCloudEvents(t *testing.T) {
	for _, on := range []bool{true, false} {
		t.Run(fmt.Sprintf("CloudEvents=%v", on), func(t *testing.T) {
			nt := newNATSTest(t)
			nt.cfg.CloudEvents, nt.cfg.CloudEventsSource = on, testCESource
			n := nt.dial(t)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			sent := ceMessages(nt.prefix + ".order.created")
			for _, m := range sent {
				if reason := n.Reject(m); reason != "" {
					t.Fatalf("%s: Reject = %q", m.ID, reason)
				}
				p, err := n.Publish(ctx, m)
				if err != nil {
					t.Fatal(err)
				}
				if res := waitResult(t, p); res.Outcome != Acked {
					t.Fatalf("%s: %+v", m.ID, res)
				}
			}
			got := nt.stored(t, nt.cfg.Stream)
			if len(got) != len(sent) {
				t.Fatalf("stream holds %d messages, want %d", len(got), len(sent))
			}
			for i, d := range got {
				m := sent[i]
				attrs := map[string]string{}
				var names []string
				for k, vs := range d.Header {
					if len(vs) != 1 {
						t.Fatalf("%s: header %s has %d values", m.ID, k, len(vs))
					}
					if strings.HasPrefix(k, "ce-") {
						v, err := cePercentDecode(vs[0])
						if err != nil {
							t.Fatalf("%s: %s = %q: %v", m.ID, k, vs[0], err)
						}
						attrs[k] = v
						continue
					}
					names = append(names, k)
				}
				sort.Strings(names)
				contract := []string{"Nats-Msg-Id", "type"}
				if !m.Tombstone {
					contract = append(contract, "Content-Type")
				}
				if want := wantHeaders(m, contract...); fmt.Sprint(names) != fmt.Sprint(want) {
					t.Fatalf("%s: headers %v, want %v", m.ID, names, want)
				}
				for _, h := range m.Headers {
					if d.Header.Get(h.Name) != h.Value {
						t.Fatalf("%s: header column %s = %q, want %q", m.ID, h.Name, d.Header.Get(h.Name), h.Value)
					}
				}
				if d.Header.Get("traceparent") != m.Traceparent || d.Header.Get("tracestate") != m.Tracestate {
					t.Fatalf("%s: trace headers %q %q", m.ID, d.Header.Get("traceparent"), d.Header.Get("tracestate"))
				}
				if m.Tombstone && (d.Header.Get("tombstone") != "true" || len(d.Data) != 0) {
					t.Fatalf("tombstone: header %q, body %d bytes", d.Header.Get("tombstone"), len(d.Data))
				}
				if !on {
					if len(attrs) != 0 {
						t.Fatalf("%s: CloudEvents off, but %v", m.ID, attrs)
					}
					continue
				}
				want := 7
				if m.AggregateID == "" {
					want--
				}
				if m.Tombstone {
					want--
				}
				if len(attrs) != want {
					t.Fatalf("%s: %d ce- headers, want %d: %v", m.ID, len(attrs), want, attrs)
				}
				checkCloudEvent(t, ceEvent(t, "ce-", attrs, "", d.Data), m)
			}
		})
	}
}

// cePercentDecode undoes the NATS binding's percent-encoding, refusing a
// value that should have been encoded and was not, and invalid UTF-8.
func cePercentDecode(v string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c == '%':
			if i+2 >= len(v) {
				return "", fmt.Errorf("truncated escape at %d", i)
			}
			x, err := strconv.ParseUint(v[i+1:i+3], 16, 8)
			if err != nil {
				return "", fmt.Errorf("bad escape at %d", i)
			}
			b.WriteByte(byte(x))
			i += 2
		case c <= ' ' || c == '"' || c >= 0x7f:
			return "", fmt.Errorf("unencoded byte %q at %d", c, i)
		default:
			b.WriteByte(c)
		}
	}
	if !utf8.ValidString(b.String()) {
		return "", fmt.Errorf("not UTF-8 once decoded")
	}
	return b.String(), nil
}

// TestCEPercentEncode: the binding's example, and every byte.
func TestCEPercentEncode(t *testing.T) {
	if got := cePercentEncode("Euro € 😀"); got != "Euro%20%E2%82%AC%20%F0%9F%98%80" {
		t.Fatalf("binding example: %q", got)
	}
	for c := 0; c < 256; c++ {
		s := "a" + string(rune(c)) + "z"
		enc := cePercentEncode(s)
		dec, err := cePercentDecode(enc)
		if err != nil || dec != s {
			t.Fatalf("%q → %q → %q, %v", s, enc, dec, err)
		}
		if plain := c > ' ' && c < 0x7f && c != '"' && c != '%'; plain != (enc == s) {
			t.Fatalf("%q encoded as %q", s, enc)
		}
	}
}

// TestCloudEventsRefuseAnEmptyType: CloudEvents require a type, so with
// RELAY_CLOUDEVENTS=binary an event with an empty event_type is
// dead-lettered rather than published as an invalid CloudEvent; without
// CloudEvents it is a valid message.
func TestCloudEventsRefuseAnEmptyType(t *testing.T) {
	m := &Message{ID: "0b5a1c9e-6f1d-4b43-9d0a-3f2e7c1a8b11", Key: "order", AggregateType: "order", Body: []byte(`{}`)}
	for _, ce := range []bool{false, true} {
		r := &RabbitMQ{cfg: RabbitMQConfig{CloudEvents: ce, CloudEventsSource: "s"}}
		n := &NATS{cfg: NATSConfig{CloudEvents: ce, CloudEventsSource: "s"}, maxPayload: 1 << 20}
		for name, got := range map[string]string{"RabbitMQ": r.Reject(m), "NATS": n.Reject(m)} {
			if ce && got != ceEmptyType || !ce && got != "" {
				t.Errorf("%s, CloudEvents %v: Reject = %q", name, ce, got)
			}
		}
	}
}
