package decoder

import (
	"fmt"
	"strings"
)

// Columns names the outbox table's columns for each of the relay's fields
// (RELAY_COLUMNS). ID, AggregateType, AggregateID, EventType and Payload
// must exist. OccurredAt empty means the table has no event time: the
// event's time is its transaction's commit time. The trace columns are read
// when the table has them and ignored when it does not.
type Columns struct {
	ID, AggregateType, AggregateID, EventType, Payload string
	OccurredAt                                         string
	Traceparent, Tracestate                            string
	// TracingSpanContext is Debezium's tracingspancontext: the span context
	// as java.util.Properties text (traceparent=…, tracestate=…).
	TracingSpanContext string
	// Headers are sent as message headers of the same names
	// (RELAY_HEADER_COLUMNS).
	Headers []string
}

// DefaultColumns is the layout `outbox-relay migrate` creates.
var DefaultColumns = Columns{
	ID: "id", AggregateType: "aggregate_type", AggregateID: "aggregate_id",
	EventType: "event_type", Payload: "payload", OccurredAt: "occurred_at",
	Traceparent: "traceparent", Tracestate: "tracestate",
}

// DebeziumColumns is Debezium's outbox event router's default layout
// (table.field.event.id, …key, …type, …payload, tracingspancontext), with no
// event time (table.field.event.timestamp is unset by default).
var DebeziumColumns = Columns{
	ID: "id", AggregateType: "aggregatetype", AggregateID: "aggregateid",
	EventType: "type", Payload: "payload",
	TracingSpanContext: "tracingspancontext",
}

// Presets are the layouts RELAY_COLUMNS can name.
var Presets = map[string]Columns{"default": DefaultColumns, "debezium": DebeziumColumns}

// ColumnFields are RELAY_COLUMNS's keys, in the order the README lists them.
var ColumnFields = []string{"id", "aggregate_type", "aggregate_id", "event_type", "payload",
	"occurred_at", "traceparent", "tracestate", "tracing_span_context"}

func (c *Columns) field(name string) *string {
	switch name {
	case "id":
		return &c.ID
	case "aggregate_type":
		return &c.AggregateType
	case "aggregate_id":
		return &c.AggregateID
	case "event_type":
		return &c.EventType
	case "payload":
		return &c.Payload
	case "occurred_at":
		return &c.OccurredAt
	case "traceparent":
		return &c.Traceparent
	case "tracestate":
		return &c.Tracestate
	case "tracing_span_context":
		return &c.TracingSpanContext
	}
	return nil
}

// ParseColumns reads RELAY_COLUMNS: an optional preset first ("default" or
// "debezium"), then field=column pairs that override it, comma-separated.
// A field not named keeps the preset's column; "occurred_at=" (or any
// optional field set to nothing) means the table has no such column.
func ParseColumns(s string) (Columns, error) {
	cols := DefaultColumns
	parts := strings.Split(s, ",")
	if p := strings.TrimSpace(parts[0]); p != "" && !strings.Contains(p, "=") {
		preset, ok := Presets[p]
		if !ok {
			return Columns{}, fmt.Errorf("unknown preset %q (known: default, debezium)", p)
		}
		cols = preset
		parts = parts[1:]
	}
	seen := map[string]bool{}
	for _, part := range parts {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok {
			return Columns{}, fmt.Errorf("%q is not field=column (a preset comes first)", part)
		}
		f := cols.field(k)
		if f == nil {
			return Columns{}, fmt.Errorf("unknown field %q (known: %s)", k, strings.Join(ColumnFields, ", "))
		}
		if seen[k] {
			return Columns{}, fmt.Errorf("field %q is mapped twice", k)
		}
		seen[k] = true
		if v == "" && required(k) {
			return Columns{}, fmt.Errorf("field %q needs a column: it cannot be left out", k)
		}
		if v == "published_at" || v == "relay_seq" {
			return Columns{}, fmt.Errorf("field %q cannot be column %q: the relay keeps that column itself", k, v)
		}
		*f = v
	}
	names := map[string]string{}
	for _, k := range ColumnFields {
		v := *cols.field(k)
		if v == "" {
			continue
		}
		if other, dup := names[v]; dup {
			return Columns{}, fmt.Errorf("column %q is mapped to both %s and %s", v, other, k)
		}
		names[v] = k
	}
	return cols, nil
}

func required(field string) bool {
	switch field {
	case "id", "aggregate_type", "aggregate_id", "event_type", "payload":
		return true
	}
	return false
}

// Column returns the column of field (one of ColumnFields), "" when unmapped.
func (c Columns) Column(field string) string {
	if f := c.field(field); f != nil {
		return *f
	}
	return ""
}

// String is the mapping in ParseColumns's form.
func (c Columns) String() string {
	var b strings.Builder
	for _, k := range ColumnFields {
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k + "=" + *c.field(k))
	}
	return b.String()
}
