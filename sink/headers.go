package sink

import (
	"strconv"
	"strings"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// Header names both sinks set besides the contract's aggregate_type,
// aggregate_id and occurred_at.
const (
	headerTraceparent = "traceparent"
	headerTracestate  = "tracestate"
	headerTombstone   = "tombstone"
)

// ceSpecVersion is the CloudEvents specversion the sinks send.
const ceSpecVersion = "1.0"

// eachColumn calls f for each of m's header columns that is sent: a name
// that reserved reports (one of the sink's own headers), or that an
// earlier column already took (by same, which compares names as the
// broker does), is skipped. config refuses both, so this only keeps what
// is sent and what is counted the same.
func eachColumn(m *Message, reserved func(string) bool, same func(a, b string) bool, f func(h decoder.Header)) {
next:
	for i, h := range m.Headers {
		if reserved(h.Name) {
			continue
		}
		for _, e := range m.Headers[:i] {
			if same(e.Name, h.Name) && !reserved(e.Name) {
				continue next
			}
		}
		f(h)
	}
}

// columnNames lists m's header columns for a reason, with their sizes,
// the largest first: at most max of them, after their count when there
// are more.
func columnNames(m *Message, sizes func(h decoder.Header) int, max int) string {
	type col struct {
		name string
		n    int
	}
	var cols []col
	for _, h := range m.Headers {
		cols = append(cols, col{h.Name, sizes(h)})
	}
	// Insertion sort: a handful of columns.
	for i := 1; i < len(cols); i++ {
		for j := i; j > 0 && cols[j].n > cols[j-1].n; j-- {
			cols[j], cols[j-1] = cols[j-1], cols[j]
		}
	}
	var b strings.Builder
	if len(cols) > max {
		b.WriteString(strconv.Itoa(len(cols)))
		b.WriteString(" columns, the largest: ")
	}
	for i, c := range cols {
		if i == max {
			b.WriteString(", …")
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(c.name)
		b.WriteString(" ")
		b.WriteString(strconv.Itoa(c.n))
	}
	return b.String()
}

// ceEmptyType is why an event without an event_type is dead-lettered when
// CloudEvents are on: the type attribute must not be empty.
const ceEmptyType = "event_type is empty; a CloudEvent's type must not be (RELAY_CLOUDEVENTS=binary)"
