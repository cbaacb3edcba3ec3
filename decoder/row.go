package decoder

// Row is an outbox row read from the table as text, as the table sweep reads
// it: each value is nil for SQL NULL. Timestamps must be in the ISO style
// with the UTC time zone, the form the replication connection's pgoutput
// sends. OccurredAt is the event's time column, or when the layout has none
// the time the sweep gives the row.
type Row struct {
	ID, AggregateType, AggregateID, EventType, Payload, OccurredAt *string
	Traceparent, Tracestate, SpanContext                           *string
	Headers                                                        []*string // RELAY_HEADER_COLUMNS, in order
	Published                                                      bool
}

// EventFromRow turns a row of the default layout into an Event; see
// Layout.EventFromRow.
func EventFromRow(r Row) Event { return defaultLayout.EventFromRow(r) }

// EventFromRow turns a row read from the table into an Event by exactly the
// rules an insert from the stream follows: a row the stream would
// dead-letter (a NULL, an occurred_at of infinity) comes out Invalid with
// the same reason, never as an error.
func (l *Layout) EventFromRow(r Row) Event {
	var buf []byte
	var vals [numRoles]span
	put := func(v *string) span {
		if v == nil {
			return span{kind: 'n'}
		}
		start := len(buf)
		buf = append(buf, *v...)
		return span{kind: 't', start: start, end: len(buf)}
	}
	for role, v := range [...]*string{r.ID, r.AggregateType, r.AggregateID, r.EventType, r.Payload, r.OccurredAt} {
		vals[role] = put(v)
	}
	for _, rv := range [...]struct {
		role int
		v    *string
	}{{colTraceparent, r.Traceparent}, {colTracestate, r.Tracestate}, {colSpanContext, r.SpanContext}} {
		if rv.v != nil {
			vals[rv.role] = put(rv.v)
		}
	}
	if r.Published {
		vals[colPublishedAt] = span{kind: 't', start: len(buf), end: len(buf)}
	} else {
		vals[colPublishedAt] = span{kind: 'n'}
	}
	var hdrs []span
	if len(l.headers) > 0 {
		hdrs = make([]span, len(l.headers))
		for i := range hdrs {
			if i < len(r.Headers) {
				hdrs[i] = put(r.Headers[i])
			} else {
				hdrs[i] = span{kind: 'n'}
			}
		}
	}
	return l.buildEvent(buf, &vals, hdrs, timeZero)
}
