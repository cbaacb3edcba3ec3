package decoder

// Row is an outbox row read from the table as text, as the table sweep reads
// it: each value is nil for SQL NULL. Timestamps must be in the ISO style
// with the UTC time zone, the form the replication connection's pgoutput
// sends.
type Row struct {
	ID, AggregateType, AggregateID, EventType, Payload, OccurredAt *string
	Published                                                      bool
}

// EventFromRow turns a row read from the table into an Event by exactly the
// rules an insert from the stream follows: a row the stream would
// dead-letter (a NULL, an occurred_at of infinity) comes out Invalid with
// the same reason, never as an error.
func EventFromRow(r Row) Event {
	var buf []byte
	var vals [numRoles]span
	for role, v := range [numRequired]*string{r.ID, r.AggregateType, r.AggregateID, r.EventType, r.Payload, r.OccurredAt} {
		if v == nil {
			vals[role] = span{kind: 'n'}
			continue
		}
		start := len(buf)
		buf = append(buf, *v...)
		vals[role] = span{kind: 't', start: start, end: len(buf)}
	}
	if r.Published {
		vals[colPublishedAt] = span{kind: 't', start: len(buf), end: len(buf)}
	} else {
		vals[colPublishedAt] = span{kind: 'n'}
	}
	return buildEvent(buf, &vals)
}
