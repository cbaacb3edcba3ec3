package decoder

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

// newInTx returns a decoder that has seen the outbox relation (with cols),
// another table and a Begin.
func newInTx(t testing.TB, cols ...string) *Decoder {
	t.Helper()
	if cols == nil {
		cols = outboxCols
	}
	d := New("public", "outbox_events", nil)
	mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events", cols...))
	mustNone(t, d, relationFrame(otherRel, "public", "orders", "id", "total"))
	m := mustDecode(t, d, beginFrame(0x100, time.Now(), 7))
	if m.Kind != KindBegin {
		t.Fatalf("kind = %v, want begin", m.Kind)
	}
	return d
}

func mustDecode(t testing.TB, d *Decoder, data []byte) Message {
	t.Helper()
	m, err := d.Decode(data)
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	return m
}

func mustNone(t testing.TB, d *Decoder, data []byte) {
	t.Helper()
	if m := mustDecode(t, d, data); m.Kind != KindNone {
		t.Fatalf("kind = %v, want none", m.Kind)
	}
}

func mustEvent(t testing.TB, d *Decoder, data []byte) Event {
	t.Helper()
	m := mustDecode(t, d, data)
	if m.Kind != KindEvent {
		t.Fatalf("kind = %v, want event", m.Kind)
	}
	return m.Event
}

var wantTS = time.Date(2026, 11, 27, 4, 5, 4, 123456000, time.UTC)

func TestBeginCommit(t *testing.T) {
	d := New("public", "outbox_events", nil)
	if d.InTransaction() {
		t.Fatal("new decoder in transaction")
	}
	ct := time.Date(2026, 11, 27, 4, 5, 4, 123456000, time.UTC)
	m := mustDecode(t, d, beginFrame(0x16B3748, ct, 4242))
	want := Begin{Xid: 4242, FinalLSN: pglogrepl.LSN(0x16B3748), CommitTime: ct}
	if m.Kind != KindBegin || !reflect.DeepEqual(m.Begin, want) {
		t.Fatalf("begin = %+v, want %+v", m, want)
	}
	if !d.InTransaction() {
		t.Fatal("not in transaction after Begin")
	}
	m = mustDecode(t, d, commitFrame(0x16B3748, 0x16B3778, ct))
	wantC := Commit{CommitLSN: 0x16B3748, EndLSN: 0x16B3778, CommitTime: ct}
	if m.Kind != KindCommit || !reflect.DeepEqual(m.Commit, wantC) {
		t.Fatalf("commit = %+v, want %+v", m, wantC)
	}
	if d.InTransaction() {
		t.Fatal("in transaction after Commit")
	}
	// Times before 2000 are negative on the wire.
	old := time.Date(1999, 12, 31, 23, 59, 59, 999999000, time.UTC)
	if m := mustDecode(t, d, beginFrame(1, old, 1)); !m.Begin.CommitTime.Equal(old) {
		t.Fatalf("commit time = %v, want %v", m.Begin.CommitTime, old)
	}
}

func TestStandardRow(t *testing.T) {
	d := newInTx(t)
	ev := mustEvent(t, d, insertFrame(outboxRel, row(`{"total":42}`)...))
	want := Event{
		ID: testID, AggregateType: "order", AggregateID: testAggID, EventType: "order.created",
		Payload: []byte(`{"total":42}`), OccurredAt: wantTS,
	}
	if !reflect.DeepEqual(ev, want) {
		t.Fatalf("event = %+v\nwant    %+v", ev, want)
	}
}

func TestColumnsOddOrderAndExtraColumns(t *testing.T) {
	d := New("public", "outbox_events", nil)
	mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events",
		"tenant", "payload", "occurred_at", "event_type", "trace_id", "aggregate_id", "id", "aggregate_type"))
	mustDecode(t, d, beginFrame(1, time.Now(), 1))
	ev := mustEvent(t, d, insertFrame(outboxRel,
		txt("acme"), txt(`[1,2]`), txt(testTS), txt("order.created"), null, txt(testAggID), txt(testID), txt("order")))
	want := Event{
		ID: testID, AggregateType: "order", AggregateID: testAggID, EventType: "order.created",
		Payload: []byte(`[1,2]`), OccurredAt: wantTS,
	}
	if !reflect.DeepEqual(ev, want) {
		t.Fatalf("event = %+v\nwant    %+v", ev, want)
	}
}

func TestAlterTableMidStream(t *testing.T) {
	d := newInTx(t)
	if ev := mustEvent(t, d, insertFrame(outboxRel, row(`1`)...)); ev.Invalid != "" {
		t.Fatal(ev.Invalid)
	}
	mustDecode(t, d, commitFrame(1, 2, time.Now()))
	mustDecode(t, d, beginFrame(3, time.Now(), 8))

	// ALTER TABLE outbox_events ADD COLUMN tenant text, DROP COLUMN published_at:
	// the server sends a new Relation for the same ID before the next change.
	mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events",
		"id", "aggregate_type", "aggregate_id", "event_type", "payload", "occurred_at", "tenant"))
	ev := mustEvent(t, d, insertFrame(outboxRel,
		txt(testID), txt("order"), txt(testAggID), txt("order.paid"), txt(`2`), txt(testTS), txt("acme")))
	if ev.Invalid != "" || ev.EventType != "order.paid" || string(ev.Payload) != "2" || ev.Published {
		t.Fatalf("event after ALTER = %+v", ev)
	}
	// A tuple that does not match the new column count is a protocol violation.
	if _, err := d.Decode(insertFrame(outboxRel, row(`1`)[:6]...)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("old-shape insert: err = %v, want ErrProtocol", err)
	}

	// published_at comes back as the first column.
	mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events",
		"published_at", "id", "aggregate_type", "aggregate_id", "event_type", "payload", "occurred_at", "tenant"))
	ev = mustEvent(t, d, insertFrame(outboxRel,
		txt(testTS), txt(testID), txt("order"), txt(testAggID), txt("order.paid"), txt(`3`), txt(testTS), null))
	if !ev.Published || string(ev.Payload) != "3" {
		t.Fatalf("event after second ALTER = %+v", ev)
	}
}

func TestOtherMessagesAreNone(t *testing.T) {
	d := newInTx(t)
	mustNone(t, d, relationFrame(otherRel+1, "audit", "outbox_events", outboxCols...))    // same name, other schema
	mustNone(t, d, relationFrame(otherRel+2, "public", "outbox_events_2", outboxCols...)) // other name
	mustNone(t, d, relationFrame(otherRel+3, "public", "Outbox_Events", outboxCols...))   // names are exact
	for name, f := range map[string][]byte{
		"insert other table":   insertFrame(otherRel, txt("1"), txt("9.99")),
		"insert other schema":  insertFrame(otherRel+1, row(`{}`)...),
		"insert similar name":  insertFrame(otherRel+2, row(`{}`)...),
		"insert case differs":  insertFrame(otherRel+3, row(`{}`)...),
		"update outbox":        updateFrame(outboxRel, nil, row(`{}`)...),
		"update with old":      updateFrame(outboxRel, row(`{}`), row(`{}`)...),
		"update other":         updateFrame(otherRel, nil, txt("1"), unchanged),
		"delete outbox":        deleteFrame(outboxRel, txt(testID), null, null, null, null, null, null),
		"delete other":         deleteFrame(otherRel, txt("1"), null),
		"truncate":             truncateFrame(outboxRel, otherRel),
		"truncate none":        truncateFrame(),
		"logical message":      messageFrame(true, "outbox_relay_heartbeat", "x"),
		"empty logical msg":    messageFrame(false, "", ""),
		"type":                 typeFrame(90001, "public", "mood"),
		"origin":               originFrame(0x1234, "node_a"),
		"relation other table": relationFrame(otherRel+4, "public", "x"),
	} {
		t.Run(name, func(t *testing.T) { mustNone(t, d, f) })
	}
	if !d.InTransaction() {
		t.Fatal("lost the transaction")
	}
}

func TestNullsAndUnchangedAreInvalid(t *testing.T) {
	for i, col := range outboxCols[:6] {
		for _, bad := range []val{null, unchanged} {
			if col == "payload" && bad == null {
				continue // a tombstone, below
			}
			d := newInTx(t)
			vals := row(`{"a":1}`)
			vals[i] = bad
			ev := mustEvent(t, d, insertFrame(outboxRel, vals...))
			if ev.Invalid == "" || !strings.Contains(ev.Invalid, `"`+col+`"`) {
				t.Errorf("%s=%c: Invalid = %q, want a reason naming the column", col, bad.kind, ev.Invalid)
			}
			if bad == null && !strings.Contains(ev.Invalid, "is null") {
				t.Errorf("%s null: Invalid = %q", col, ev.Invalid)
			}
			if col != "id" && ev.ID != testID {
				t.Errorf("%s=%c: ID = %q, want it set anyway", col, bad.kind, ev.ID)
			}
			if !ev.OccurredAt.IsZero() {
				t.Errorf("%s=%c: OccurredAt = %v, want zero when invalid", col, bad.kind, ev.OccurredAt)
			}
		}
	}
	// published_at is optional: NULL is the normal case.
	d := newInTx(t)
	if ev := mustEvent(t, d, insertFrame(outboxRel, row(`{}`)...)); ev.Invalid != "" || ev.Published {
		t.Fatalf("null published_at: %+v", ev)
	}
	// Without a published_at column at all.
	d = newInTx(t, outboxCols[:6]...)
	if ev := mustEvent(t, d, insertFrame(outboxRel, row(`{}`)[:6]...)); ev.Invalid != "" || ev.Published {
		t.Fatalf("no published_at column: %+v", ev)
	}
	// The example reason from the contract.
	d = newInTx(t)
	vals := row(`{}`)
	vals[1] = null
	if ev := mustEvent(t, d, insertFrame(outboxRel, vals...)); ev.Invalid != `column "aggregate_type" is null` {
		t.Fatalf("Invalid = %q", ev.Invalid)
	}
	// A NULL payload is Debezium's tombstone: an event with an empty body.
	vals = row(`{}`)
	vals[4] = null
	if ev := mustEvent(t, d, insertFrame(outboxRel, vals...)); ev.Invalid != "" || !ev.Tombstone || ev.Payload == nil || len(ev.Payload) != 0 {
		t.Fatalf("null payload: %+v", ev)
	}
}

func TestPublished(t *testing.T) {
	d := newInTx(t)
	vals := row(`{}`)
	vals[6] = txt("2026-11-27 04:05:05+00")
	ev := mustEvent(t, d, insertFrame(outboxRel, vals...))
	if !ev.Published || ev.Invalid != "" || ev.ID != testID {
		t.Fatalf("event = %+v, want Published", ev)
	}
}

func TestTimestamps(t *testing.T) {
	utc := func(y, mo, d, h, mi, s, ns int) time.Time {
		return time.Date(y, time.Month(mo), d, h, mi, s, ns, time.UTC)
	}
	valid := map[string]time.Time{
		"2026-11-27 04:05:04.123456+00": utc(2026, 11, 27, 4, 5, 4, 123456000),
		"2026-11-27 04:05:04+00":        utc(2026, 11, 27, 4, 5, 4, 0),
		"2026-11-27 04:05:04.1+00":      utc(2026, 11, 27, 4, 5, 4, 100000000),
		"2026-11-27 04:05:04.12+00":     utc(2026, 11, 27, 4, 5, 4, 120000000),
		"2026-11-27 04:05:04.123+00":    utc(2026, 11, 27, 4, 5, 4, 123000000),
		"2026-11-27 04:05:04.1234+00":   utc(2026, 11, 27, 4, 5, 4, 123400000),
		"2026-11-27 04:05:04.12345+00":  utc(2026, 11, 27, 4, 5, 4, 123450000),
		"2026-11-27 04:05:04.000001+00": utc(2026, 11, 27, 4, 5, 4, 1000),
		"2026-11-27 09:35:04+05:30":     utc(2026, 11, 27, 4, 5, 4, 0),
		"2026-11-27 00:35:04-03:30":     utc(2026, 11, 27, 4, 5, 4, 0),
		"2026-11-27 00:34:49-03:30:15":  utc(2026, 11, 27, 4, 5, 4, 0),
		"2026-11-27 06:05:04.5+02":      utc(2026, 11, 27, 4, 5, 4, 500000000),
		"2026-11-26 23:05:04-05":        utc(2026, 11, 27, 4, 5, 4, 0),
		"1901-12-13 20:45:52+00":        utc(1901, 12, 13, 20, 45, 52, 0),
		"0001-01-01 00:00:00+00":        utc(1, 1, 1, 0, 0, 0, 0),
		"2024-02-29 12:00:00+00":        utc(2024, 2, 29, 12, 0, 0, 0),
		"2000-02-29 12:00:00+00":        utc(2000, 2, 29, 12, 0, 0, 0),
		"12026-01-01 00:00:00+00":       utc(12026, 1, 1, 0, 0, 0, 0),
		"2026-11-27T04:05:04Z":          utc(2026, 11, 27, 4, 5, 4, 0),
		// A timestamp without time zone (a column RELAY_COLUMNS maps): UTC.
		"2026-11-27 04:05:04":           utc(2026, 11, 27, 4, 5, 4, 0),
		"2026-11-27 04:05:04.250001":    utc(2026, 11, 27, 4, 5, 4, 250001000),
		"2026-12-31 23:59:59.999999-14": utc(2027, 1, 1, 13, 59, 59, 999999000),
	}
	for text, want := range valid {
		d := newInTx(t)
		vals := row(`{}`)
		vals[5] = txt(text)
		ev := mustEvent(t, d, insertFrame(outboxRel, vals...))
		if ev.Invalid != "" || !ev.OccurredAt.Equal(want) || ev.OccurredAt.Location() != time.UTC {
			t.Errorf("%q: OccurredAt = %v (Invalid %q), want %v", text, ev.OccurredAt, ev.Invalid, want)
		}
	}
	invalid := []string{
		"infinity", "-infinity", "0044-03-15 12:00:00+00 BC", "", "2026-11-27", "2026-11-27 04:05", "2026-11-27 04:05:04.",
		"2026-13-01 00:00:00+00", "2026-00-01 00:00:00+00", "2026-02-29 00:00:00+00", "1900-02-29 00:00:00+00",
		"2026-04-31 00:00:00+00", "2026-11-27 24:00:00+00", "2026-11-27 04:60:00+00", "2026-11-27 04:05:60+00",
		"2026-11-27 04:05:04.+00", "2026-11-27 04:05:04.1234567890+00", "2026-11-27 04:05:04+5", "2026-11-27 04:05:04+05:3",
		"2026-11-27 04:05:04+00:60", "2026-11-27 04:05:04+16", "2026-11-27 04:05:04+00 ", " 2026-11-27 04:05:04+00",
		"26-11-27 04:05:04+00", "0000-01-01 00:00:00+00", "2026/11/27 04:05:04+00", "2026-11-27 04:05:04+00:00:00:00",
		"２０２６-11-27 04:05:04+00", "NaN",
	}
	for _, text := range invalid {
		d := newInTx(t)
		vals := row(`{}`)
		vals[5] = txt(text)
		ev := mustEvent(t, d, insertFrame(outboxRel, vals...))
		if ev.Invalid == "" || !ev.OccurredAt.IsZero() || ev.ID != testID {
			t.Errorf("%q: accepted as %v", text, ev.OccurredAt)
		}
	}
	d := newInTx(t)
	vals := row(`{}`)
	vals[5] = txt("infinity")
	if ev := mustEvent(t, d, insertFrame(outboxRel, vals...)); ev.Invalid != `column "occurred_at": cannot parse "infinity"` {
		t.Fatalf("Invalid = %q", ev.Invalid)
	}
}

func TestPayloadByteExact(t *testing.T) {
	deep := strings.Repeat(`{"a":[`, 500) + `null` + strings.Repeat(`]}`, 500)
	big := `{"blob":"` + strings.Repeat("x", 1<<20) + `"}`
	for name, p := range map[string]string{
		"null":      `null`,
		"array":     `[1, "two", {"three": 3}, [], {}]`,
		"string":    `"str"`,
		"number":    `1e3`,
		"negative":  `-0.5E-10`,
		"bool":      `true`,
		"deep":      deep,
		"unicode":   `{"name": "Zoë ✓ 日本語 🎉", "esc": "\u00e9\ud83c\udf89\n\"\\"}`,
		"nul esc":   `"\u0000"`,
		"spaces":    " {\n\t\"a\" :  1 } ",
		"1 MB":      big,
		"empty obj": `{}`,
	} {
		t.Run(name, func(t *testing.T) {
			d := newInTx(t)
			ev := mustEvent(t, d, insertFrame(outboxRel, row(p)...))
			if !bytes.Equal(ev.Payload, []byte(p)) || ev.Invalid != "" {
				t.Fatalf("payload differs (len %d, want %d), Invalid %q", len(ev.Payload), len(p), ev.Invalid)
			}
		})
	}
	// An empty text value is carried as empty, not as missing.
	d := newInTx(t)
	ev := mustEvent(t, d, insertFrame(outboxRel, row(``)...))
	if ev.Payload == nil || len(ev.Payload) != 0 {
		t.Fatalf("empty payload = %#v", ev.Payload)
	}
}

func TestBufferReuse(t *testing.T) {
	d := newInTx(t)
	vals := row(`{"k":"v"}`)
	vals[6] = txt(testTS)
	buf := insertFrame(outboxRel, vals...)
	ev := mustEvent(t, d, buf)
	want := Event{
		ID: testID, AggregateType: "order", AggregateID: testAggID, EventType: "order.created",
		Payload: []byte(`{"k":"v"}`), OccurredAt: wantTS, Published: true,
	}
	for i := range buf {
		buf[i] = 0xAA
	}
	if !reflect.DeepEqual(ev, want) {
		t.Fatalf("after reuse event = %+v\nwant %+v", ev, want)
	}
	// The payload is private: changing it does not change a second decode.
	buf = insertFrame(outboxRel, vals...)
	ev1 := mustEvent(t, d, buf)
	ev2 := mustEvent(t, d, buf)
	ev1.Payload[0] = 'X'
	if ev2.Payload[0] != '{' {
		t.Fatal("payloads share memory")
	}

	// Relation names must be copied too: reuse the Relation buffer, then insert.
	d = New("public", "outbox_events", nil)
	rb := relationFrame(outboxRel, "public", "outbox_events", outboxCols...)
	mustNone(t, d, rb)
	for i := range rb {
		rb[i] = 0
	}
	mustDecode(t, d, beginFrame(1, time.Now(), 1))
	if ev := mustEvent(t, d, insertFrame(outboxRel, row(`{}`)...)); ev.Invalid != "" {
		t.Fatal(ev.Invalid)
	}
}

// validFrames is one of each message the decoder accepts, in a valid order
// starting from a decoder returned by newInTx.
func validFrames() [][]byte {
	vals := row(`{"a":[1,2,3]}`)
	vals[6] = txt(testTS)
	return [][]byte{
		relationFrame(outboxRel, "public", "outbox_events", outboxCols...),
		typeFrame(90001, "public", "mood"),
		originFrame(0x1234, "node_a"),
		insertFrame(outboxRel, row(`{"a":[1,2,3]}`)...),
		insertFrame(outboxRel, vals...),
		insertFrame(otherRel, txt("1"), null),
		updateFrame(otherRel, []val{txt("1"), null}, txt("1"), unchanged),
		deleteFrame(otherRel, txt("1"), null),
		truncateFrame(otherRel),
		messageFrame(true, "p", "content"),
		commitFrame(0x100, 0x130, time.Now()),
		beginFrame(0x200, time.Now(), 8),
	}
}

func TestTruncatedFramesAreProtocolErrors(t *testing.T) {
	for _, f := range validFrames() {
		for n := 0; n < len(f); n++ {
			d := newInTx(t)
			if f[0] == 'B' {
				mustDecode(t, d, commitFrame(1, 2, time.Now()))
			}
			m, err := d.Decode(f[:n])
			if !errors.Is(err, ErrProtocol) {
				t.Errorf("%q truncated to %d of %d bytes: err = %v (kind %v), want ErrProtocol", f[0], n, len(f), err, m.Kind)
			}
		}
		d := newInTx(t)
		if f[0] == 'B' {
			mustDecode(t, d, commitFrame(1, 2, time.Now()))
		}
		if _, err := d.Decode(append(bytes.Clone(f), 0)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%q with a trailing byte: err = %v, want ErrProtocol", f[0], err)
		}
	}
}

func TestBadLengths(t *testing.T) {
	d := newInTx(t)
	good := insertFrame(outboxRel, row(`{}`)...)
	for name, f := range map[string][]byte{
		"negative length": frame{'I'}.u32(outboxRel).u8('N').u16(7).u8('t').u32(0xFFFFFFFF),
		"length too big":  frame{'I'}.u32(outboxRel).u8('N').u16(7).u8('t').u32(1 << 30).raw([]byte("abc")),
		"unknown kind":    frame{'I'}.u32(outboxRel).u8('N').u16(7).u8('x'),
		"too few columns": insertFrame(outboxRel, row(`{}`)[:6]...),
		"too many":        insertFrame(outboxRel, append(row(`{}`), null)...),
		"not N":           append([]byte{'I', 0, 0, 0x40, 0, 'K'}, good[6:]...),
		"negative msg":    frame{'M'}.u8(0).u64(1).str("p").u32(0x80000000),
		"truncate count":  frame{'T'}.u32(3).u8(0).u32(1),
		"update no N":     frame{'U'}.u32(otherRel).u8('O').tuple([]val{null, null}).u8('O').tuple([]val{null, null}),
		"update bad tag":  frame{'U'}.u32(otherRel).u8('X'),
		"delete bad tag":  frame{'D'}.u32(otherRel).u8('N').tuple([]val{null, null}),
		"relation no nul": []byte("R\x00\x00\x40\x00public"),
	} {
		if _, err := d.Decode(f); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: err = %v, want ErrProtocol", name, err)
		}
	}
}

func TestProtocolState(t *testing.T) {
	ins := insertFrame(outboxRel, row(`{}`)...)
	for name, run := range map[string]func(d *Decoder) error{
		"empty":             func(d *Decoder) error { _, err := d.Decode(nil); return err },
		"unknown type":      func(d *Decoder) error { _, err := d.Decode([]byte{'Z', 0, 0}); return err },
		"stream start (v2)": func(d *Decoder) error { _, err := d.Decode(frame{'S'}.u32(1).u8(1)); return err },
		"commit without tx": func(d *Decoder) error { _, err := d.Decode(commitFrame(1, 2, time.Now())); return err },
		"insert without tx": func(d *Decoder) error { _, err := d.Decode(ins); return err },
		"truncate outside":  func(d *Decoder) error { _, err := d.Decode(truncateFrame(outboxRel)); return err },
		"update outside":    func(d *Decoder) error { _, err := d.Decode(updateFrame(otherRel, nil, null, null)); return err },
		"delete outside":    func(d *Decoder) error { _, err := d.Decode(deleteFrame(otherRel, null, null)); return err },
		"begin inside begin": func(d *Decoder) error {
			d.Decode(beginFrame(1, time.Now(), 1))
			_, err := d.Decode(beginFrame(1, time.Now(), 1))
			return err
		},
	} {
		d := New("public", "outbox_events", nil)
		mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events", outboxCols...))
		mustNone(t, d, relationFrame(otherRel, "public", "orders", "id", "total"))
		if err := run(d); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: err = %v, want ErrProtocol", name, err)
		}
	}
}

func TestUnknownRelation(t *testing.T) {
	d := New("public", "outbox_events", nil)
	mustDecode(t, d, beginFrame(1, time.Now(), 1))
	for _, f := range [][]byte{
		insertFrame(outboxRel, row(`{}`)...),
		updateFrame(outboxRel, nil, row(`{}`)...),
		deleteFrame(outboxRel, txt(testID)),
	} {
		if _, err := d.Decode(f); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "16384") {
			t.Errorf("%q on unknown relation: err = %v, want ErrProtocol naming it", f[0], err)
		}
	}
}

func TestMissingRequiredColumn(t *testing.T) {
	d := New("public", "outbox_events", nil)
	_, err := d.Decode(relationFrame(outboxRel, "public", "outbox_events",
		"id", "aggregate_type", "event_type", "occurred_at", "published_at", "extra"))
	if !errors.Is(err, ErrSchema) || errors.Is(err, ErrProtocol) {
		t.Fatalf("err = %v, want ErrSchema", err)
	}
	for _, s := range []string{"public.outbox_events", "aggregate_id", "payload"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
	// Inserts on the broken relation keep failing; they must not be skipped.
	mustDecode(t, d, beginFrame(1, time.Now(), 1))
	bad := insertFrame(outboxRel, txt(testID), txt("order"), txt("order.created"), txt(testTS), null, txt("x"))
	if _, err := d.Decode(bad); !errors.Is(err, ErrSchema) {
		t.Fatalf("insert on broken relation: err = %v, want ErrSchema", err)
	}
	// A corrected Relation message heals it.
	mustNone(t, d, relationFrame(outboxRel, "public", "outbox_events", outboxCols...))
	if ev := mustEvent(t, d, insertFrame(outboxRel, row(`{}`)...)); ev.Invalid != "" {
		t.Fatal(ev.Invalid)
	}
	// Other tables with the same shape are not checked.
	mustNone(t, d, relationFrame(otherRel, "public", "outbox_events_archive", "id"))
}

func TestWholeTransaction(t *testing.T) {
	d := New("public", "outbox_events", nil)
	ct := time.Date(2026, 11, 27, 4, 5, 4, 0, time.UTC)
	stream := [][]byte{
		beginFrame(0x300, ct, 9),
		relationFrame(otherRel, "public", "orders", "id", "total"),
		insertFrame(otherRel, txt("1"), txt("9.99")),
		relationFrame(outboxRel, "public", "outbox_events", outboxCols...),
		insertFrame(outboxRel, row(`{"n":1}`)...),
		insertFrame(outboxRel, row(`{"n":2}`)...),
		messageFrame(true, "outbox_relay_heartbeat", ""),
		commitFrame(0x300, 0x330, ct),
	}
	var kinds []Kind
	var payloads []string
	for _, f := range stream {
		m := mustDecode(t, d, f)
		kinds = append(kinds, m.Kind)
		if m.Kind == KindEvent {
			payloads = append(payloads, string(m.Event.Payload))
		}
		if m.Kind == KindCommit && m.Commit.EndLSN != 0x330 {
			t.Fatalf("EndLSN = %v", m.Commit.EndLSN)
		}
	}
	wantKinds := []Kind{KindBegin, KindNone, KindNone, KindNone, KindEvent, KindEvent, KindNone, KindCommit}
	if !reflect.DeepEqual(kinds, wantKinds) || !reflect.DeepEqual(payloads, []string{`{"n":1}`, `{"n":2}`}) {
		t.Fatalf("kinds %v payloads %v", kinds, payloads)
	}
}

func TestInsertAllocs(t *testing.T) {
	if testing.Short() {
		t.Skip()
	}
	d := newInTx(t)
	f := insertFrame(outboxRel, row(`{"order_id":"7d3f0c2a","total":4200}`)...)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := d.Decode(f); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 2 {
		t.Fatalf("Insert decode allocates %v times, want <= 2", allocs)
	}
}

func BenchmarkDecodeInsert(b *testing.B) {
	d := newInTx(b)
	payload := `{"order_id":"7d3f0c2a-1b4e-4c6d-8e9f-0a1b2c3d4e5f","customer":{"id":"c-1029","tier":"gold"},` +
		`"lines":[{"sku":"A-1","qty":2,"price":1999},{"sku":"B-7","qty":1,"price":4999}],"total":8997,"currency":"EUR"}`
	f := insertFrame(outboxRel, row(payload)...)
	b.ReportAllocs()
	b.SetBytes(int64(len(f)))
	for b.Loop() {
		m, err := d.Decode(f)
		if err != nil || m.Kind != KindEvent {
			b.Fatal(err)
		}
	}
}
