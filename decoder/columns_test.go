package decoder

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseColumns(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Columns
	}{
		{"", DefaultColumns},
		{"default", DefaultColumns},
		{"debezium", DebeziumColumns},
		{"debezium,occurred_at=timestamp", func() Columns { c := DebeziumColumns; c.OccurredAt = "timestamp"; return c }()},
		{"event_type=kind, occurred_at=", func() Columns { c := DefaultColumns; c.EventType, c.OccurredAt = "kind", ""; return c }()},
		{"id=id,aggregate_type=aggregatetype,aggregate_id=aggregateid,event_type=type,payload=payload,occurred_at=,traceparent=,tracestate=,tracing_span_context=tracingspancontext", DebeziumColumns},
	} {
		got, err := ParseColumns(c.in)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("ParseColumns(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
		if again, err := ParseColumns(got.String()); err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("String() of %q does not parse back: %q → %+v, %v", c.in, got.String(), again, err)
		}
	}
	for in, wantErr := range map[string]string{
		"debezum":                   `unknown preset "debezum"`,
		"kind=type":                 `unknown field "kind"`,
		"payload=":                  `field "payload" needs a column`,
		"event_type=a,event_type=b": `mapped twice`,
		"event_type=payload":        `column "payload" is mapped to both`,
		"debezium,event_type":       `"event_type" is not field=column`,
		"occurred_at=published_at":  `cannot be column "published_at"`,
		"aggregate_id=relay_seq":    `cannot be column "relay_seq"`,
	} {
		if _, err := ParseColumns(in); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("ParseColumns(%q) error = %v, want it to say %s", in, err, wantErr)
		}
	}
}

// debeziumCols is Debezium's documented outbox table, plus what migrate
// adds (published_at, relay_seq) and two extra columns.
var debeziumCols = []string{"id", "aggregatetype", "aggregateid", "type", "payload", "tracingspancontext",
	"tenant_id", "published_at", "relay_seq", "schema_version"}

const testTraceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

func debeziumDecoder(t *testing.T, commit time.Time, headers ...string) *Decoder {
	t.Helper()
	cols := DebeziumColumns
	cols.Headers = headers
	d := New("public", "outboxevent", NewLayout(cols))
	mustNone(t, d, relationFrame(outboxRel, "public", "outboxevent", debeziumCols...))
	if m := mustDecode(t, d, beginFrame(0x100, commit, 7)); m.Kind != KindBegin {
		t.Fatalf("kind = %v", m.Kind)
	}
	return d
}

func TestDebeziumLayout(t *testing.T) {
	commit := time.Date(2026, 12, 2, 10, 11, 12, 345678000, time.UTC)
	d := debeziumDecoder(t, commit, "tenant_id", "schema_version")
	spanCtx := "#Wed Dec 02 10:11:12 UTC 2026\ntraceparent=" + testTraceparent + "\ntracestate=congo\\=t61rcWkgMzE\n"
	ev := mustEvent(t, d, insertFrame(outboxRel,
		txt(testID), txt("order"), txt("customer-42/A"), txt("OrderCreated"), txt(`{"a":1}`), txt(spanCtx),
		null, null, txt("17"), txt("v2")))
	want := Event{ID: testID, AggregateType: "order", AggregateID: "customer-42/A", EventType: "OrderCreated",
		Payload: []byte(`{"a":1}`), OccurredAt: commit, Traceparent: testTraceparent, Tracestate: "congo=t61rcWkgMzE",
		Headers: []Header{{"schema_version", "v2"}}}
	if !reflect.DeepEqual(ev, want) {
		t.Fatalf("event\n got %+v\nwant %+v", ev, want)
	}
	// A tombstone, and a NULL header left out.
	ev = mustEvent(t, d, insertFrame(outboxRel,
		txt(testID), txt("order"), txt("42"), txt("OrderDeleted"), null, null, txt("t1"), null, txt("18"), null))
	if !ev.Tombstone || len(ev.Payload) != 0 || ev.Payload == nil || ev.Invalid != "" ||
		!reflect.DeepEqual(ev.Headers, []Header{{"tenant_id", "t1"}}) || ev.Traceparent != "" {
		t.Fatalf("tombstone: %+v", ev)
	}
}

func TestMissingMappedColumnsAreNamed(t *testing.T) {
	cols := DebeziumColumns
	cols.OccurredAt = "timestamp"
	cols.Headers = []string{"tenant"}
	d := New("public", "outboxevent", NewLayout(cols))
	_, err := d.Decode(relationFrame(outboxRel, "public", "outboxevent", "id", "aggregatetype", "aggregateid", "payload"))
	if !errors.Is(err, ErrSchema) || !strings.HasSuffix(err.Error(), "has no column type, timestamp, tenant") {
		t.Fatalf("err = %v", err)
	}
	// The optional trace columns may be missing.
	d = New("public", "outbox_events", nil)
	if _, err := d.Decode(relationFrame(outboxRel, "public", "outbox_events", outboxCols...)); err != nil {
		t.Fatal(err)
	}
}

func TestTraceColumns(t *testing.T) {
	d := New("public", "outbox_events", nil)
	mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events", append(outboxCols, "traceparent", "tracestate")...))
	mustDecode(t, d, beginFrame(0x100, time.Now(), 7))
	for _, c := range []struct{ tp, ts, wantTP, wantTS string }{
		{testTraceparent, "a=1,b=2", testTraceparent, "a=1,b=2"},
		{testTraceparent, "", testTraceparent, ""},
		{testTraceparent, "a=1\r\nb=2", testTraceparent, ""},             // not one header value
		{testTraceparent, strings.Repeat("a", 513), testTraceparent, ""}, // over W3C's 512
		{testTraceparent, " a=1", testTraceparent, ""},                   // NATS would trim it
		{testTraceparent, "a=1 ", testTraceparent, ""},
		{"01" + testTraceparent[2:] + "-x ", "", "", ""},
		{strings.ToUpper(testTraceparent), "a=1", "", ""},
		{"00-00000000000000000000000000000000-b7ad6b7169203331-01", "", "", ""},
		{"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", "", "", ""},
		{testTraceparent + "-extra", "", "", ""}, // version 00 has no more fields
		{"01" + testTraceparent[2:] + "-extra", "", "01" + testTraceparent[2:] + "-extra", ""},
		{"ff" + testTraceparent[2:], "", "", ""},
		{"\n" + testTraceparent, "", "", ""},
		{"", "a=1", "", ""},
	} {
		vals := append(row(`{}`), txt(c.tp), txt(c.ts))
		ev := mustEvent(t, d, insertFrame(outboxRel, vals...))
		if ev.Traceparent != c.wantTP || ev.Tracestate != c.wantTS || ev.Invalid != "" {
			t.Errorf("traceparent %q, tracestate %q: got %q, %q (%q)", c.tp, c.ts, ev.Traceparent, ev.Tracestate, ev.Invalid)
		}
	}
}

func TestParseSpanContext(t *testing.T) {
	for in, want := range map[string][2]string{
		"traceparent=" + testTraceparent:                                   {testTraceparent, ""},
		"#comment\r\n! other\r\ntraceparent : " + testTraceparent + "\r\n": {testTraceparent, ""},
		"tracestate=a\\=1\ntraceparent=" + testTraceparent:                 {testTraceparent, "a=1"},
		"tracestate=a=1":                  {"", ""}, // no trace without a traceparent
		"traceparent=not-a-trace":         {"", ""},
		"uber-trace-id=abc:def:0:1":       {"", ""},
		strings.Repeat("x", 100<<10) + "": {"", ""},
	} {
		tp, ts := parseSpanContext([]byte(in))
		if tp != want[0] || ts != want[1] {
			t.Errorf("parseSpanContext(%.40q) = %q, %q; want %q, %q", in, tp, ts, want[0], want[1])
		}
	}
}

func TestLayoutEventFromRowMatchesTheStream(t *testing.T) {
	commit := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	cols := DebeziumColumns
	cols.Headers = []string{"tenant_id"}
	l := NewLayout(cols)
	s := func(v string) *string { return &v }
	ev := l.EventFromRow(Row{ID: s(testID), AggregateType: s("order"), AggregateID: s("x"), EventType: s("T"),
		OccurredAt: s("2026-12-02 10:00:00+00"), SpanContext: s("traceparent=" + testTraceparent), Headers: []*string{s("t1")}})
	d := debeziumDecoder(t, commit, "tenant_id")
	fromStream := mustEvent(t, d, insertFrame(outboxRel,
		txt(testID), txt("order"), txt("x"), txt("T"), null, txt("traceparent="+testTraceparent), txt("t1"), null, txt("1"), null))
	if !reflect.DeepEqual(ev, fromStream) {
		t.Fatalf("from the table\n %+v\nfrom the stream\n %+v", ev, fromStream)
	}
}
