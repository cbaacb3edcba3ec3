package decoder

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
)

// ErrProtocol is wrapped by errors for input that violates the pgoutput
// protocol: the stream cannot be trusted past it.
var ErrProtocol = errors.New("pgoutput protocol violation")

// ErrSchema is wrapped by errors for an outbox table that lacks a required
// column.
var ErrSchema = errors.New("outbox table schema")

// Kind says which field of a Message is set.
type Kind uint8

const (
	// KindNone: nothing for the relay (other tables, Type, Origin, Truncate,
	// logical Message, Update/Delete on any table, Relation).
	KindNone Kind = iota
	KindBegin
	KindEvent
	KindCommit
)

func (k Kind) String() string {
	switch k {
	case KindNone:
		return "none"
	case KindBegin:
		return "begin"
	case KindEvent:
		return "event"
	case KindCommit:
		return "commit"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Begin starts a transaction.
type Begin struct {
	Xid        uint32
	FinalLSN   pglogrepl.LSN // LSN of the commit record
	CommitTime time.Time
}

// Commit ends a transaction.
type Commit struct {
	CommitLSN  pglogrepl.LSN
	EndLSN     pglogrepl.LSN // TransactionEndLSN: the LSN the relay acknowledges
	CommitTime time.Time
}

// Event is one row inserted into the outbox table.
type Event struct {
	ID            string // the uuid's text as sent
	AggregateType string
	AggregateID   string
	EventType     string
	Payload       []byte    // the payload column's text bytes exactly, a private copy; empty for a tombstone
	OccurredAt    time.Time // in UTC (the commit time when the table has no occurred_at); zero if Invalid
	Published     bool      // the row already had published_at set: the relay must skip it
	// Tombstone: the payload was NULL (Debezium's tombstone). Payload is
	// empty and the message says so in a header.
	Tombstone bool
	// Traceparent and Tracestate are the producer's W3C trace context, from
	// the trace columns or Debezium's tracingspancontext; empty when the
	// row has none or it is malformed (a trace context is never a reason to
	// refuse an event).
	Traceparent, Tracestate string
	// Headers are the non-NULL RELAY_HEADER_COLUMNS, in their order.
	Headers []Header
	// Invalid is non-empty when the row cannot become a message; it is the
	// reason. The fields that could be read (ID in particular) are still set.
	Invalid string
}

// Header is one extra column sent as a message header: the column's name
// and its value as text.
type Header struct{ Name, Value string }

// Message is one decoded pgoutput message.
type Message struct {
	Kind   Kind
	Begin  Begin  // Kind == KindBegin
	Event  Event  // Kind == KindEvent
	Commit Commit // Kind == KindCommit
}

// Column roles in the outbox table. The first five are required, and
// occurred_at too when the layout names it; RELAY_HEADER_COLUMNS follow as
// roles numRoles, numRoles+1, ...
const (
	colID = iota
	colAggregateType
	colAggregateID
	colEventType
	colPayload
	colOccurredAt
	colPublishedAt
	colTraceparent
	colTracestate
	colSpanContext
	numRoles
	numRequired = colOccurredAt + 1
)

// Layout is a table's columns as the decoder finds them: the column name
// of each role ("" when the table has none) and the header columns.
type Layout struct {
	names   [numRoles]string
	headers []string
}

// NewLayout returns the layout of cols. published_at is the relay's own
// column and is not mapped.
func NewLayout(cols Columns) *Layout {
	l := &Layout{headers: cols.Headers}
	l.names = [numRoles]string{cols.ID, cols.AggregateType, cols.AggregateID, cols.EventType, cols.Payload,
		cols.OccurredAt, "published_at", cols.Traceparent, cols.Tracestate, cols.TracingSpanContext}
	return l
}

var defaultLayout = NewLayout(DefaultColumns)

var timeZero time.Time

// role returns the role of a column name, or -1.
func (l *Layout) role(col string) int {
	for role, n := range l.names {
		if n != "" && n == col {
			return role
		}
	}
	for i, n := range l.headers {
		if n == col {
			return numRoles + i
		}
	}
	return -1
}

// required reports whether the table must have role's column.
func (l *Layout) required(role int) bool {
	return role < colOccurredAt || (role == colOccurredAt && l.names[colOccurredAt] != "") || role >= numRoles
}

func (l *Layout) name(role int) string {
	if role >= numRoles {
		return l.headers[role-numRoles]
	}
	return l.names[role]
}

// relation is a cached Relation message. Only the outbox table keeps its
// column roles; other tables are remembered so their changes can be
// recognised as known.
type relation struct {
	outbox    bool
	ncols     int
	roles     []int16 // column position -> role, or -1; outbox only
	schemaErr error   // outbox table without a required column
}

// Decoder decodes one replication session's pgoutput messages. It is not
// safe for concurrent use.
type Decoder struct {
	schema, table string
	layout        *Layout
	relations     map[uint32]*relation
	inTx          bool
	commitTime    time.Time // of the open transaction, from its Begin
}

// New returns a decoder for inserts on schema.table (e.g. "public",
// "outbox_events") with the layout l (nil: DefaultColumns).
func New(schema, table string, l *Layout) *Decoder {
	if l == nil {
		l = defaultLayout
	}
	return &Decoder{schema: schema, table: table, layout: l, relations: make(map[uint32]*relation)}
}

// InTransaction reports whether a Begin was seen without its Commit.
func (d *Decoder) InTransaction() bool { return d.inTx }

// Decode decodes one pgoutput message. data is not retained and nothing
// returned aliases it.
func (d *Decoder) Decode(data []byte) (Message, error) {
	if len(data) == 0 {
		return Message{}, protoErr("empty message")
	}
	r := reader{buf: data, pos: 1}
	switch t := data[0]; t {
	case 'I':
		return d.insert(&r)
	case 'B':
		return d.begin(&r)
	case 'C':
		return d.commit(&r)
	case 'R':
		return Message{}, d.relation(&r)
	case 'U':
		return Message{}, d.update(&r)
	case 'D':
		return Message{}, d.delete(&r)
	case 'T':
		return Message{}, d.truncate(&r)
	case 'Y':
		r.u32()
		r.cstring()
		r.cstring()
		return Message{}, r.finish("type")
	case 'O':
		r.u64()
		r.cstring()
		return Message{}, r.finish("origin")
	case 'M':
		r.u8()
		r.u64()
		r.cstring()
		n := r.i32()
		if n < 0 {
			r.fail()
		}
		r.skip(int(n))
		return Message{}, r.finish("logical message")
	default:
		return Message{}, protoErr(fmt.Sprintf("unknown message type %q", rune(t)))
	}
}

func (d *Decoder) begin(r *reader) (Message, error) {
	lsn := r.u64()
	ts := r.u64()
	xid := r.u32()
	if err := r.finish("begin"); err != nil {
		return Message{}, err
	}
	if d.inTx {
		return Message{}, protoErr("begin inside a transaction")
	}
	d.inTx = true
	d.commitTime = pgTime(int64(ts))
	return Message{Kind: KindBegin, Begin: Begin{
		Xid:        xid,
		FinalLSN:   pglogrepl.LSN(lsn),
		CommitTime: d.commitTime,
	}}, nil
}

func (d *Decoder) commit(r *reader) (Message, error) {
	r.u8() // flags, unused
	commitLSN := r.u64()
	endLSN := r.u64()
	ts := r.u64()
	if err := r.finish("commit"); err != nil {
		return Message{}, err
	}
	if !d.inTx {
		return Message{}, protoErr("commit outside a transaction")
	}
	d.inTx = false
	return Message{Kind: KindCommit, Commit: Commit{
		CommitLSN:  pglogrepl.LSN(commitLSN),
		EndLSN:     pglogrepl.LSN(endLSN),
		CommitTime: pgTime(int64(ts)),
	}}, nil
}

func (d *Decoder) relation(r *reader) error {
	id := r.u32()
	ns := r.cstring()
	name := r.cstring()
	r.u8() // replica identity
	n := int(r.u16())
	if r.bad {
		return protoErr("relation: truncated")
	}
	rel := &relation{ncols: n}
	rel.outbox = string(ns) == d.schema && string(name) == d.table
	if rel.outbox {
		rel.roles = make([]int16, n)
	}
	l := d.layout
	found := make([]bool, numRoles+len(l.headers))
	for i := 0; i < n; i++ {
		r.u8() // flags
		col := r.cstring()
		r.u32() // type oid
		r.u32() // type modifier
		if r.bad {
			return protoErr("relation: truncated column list")
		}
		if !rel.outbox {
			continue
		}
		role := l.role(string(col))
		rel.roles[i] = int16(role)
		if role >= 0 {
			found[role] = true
		}
	}
	if err := r.finish("relation"); err != nil {
		return err
	}
	if rel.outbox {
		var missing []string
		for role := range found {
			if l.required(role) && !found[role] {
				missing = append(missing, l.name(role))
			}
		}
		if len(missing) > 0 {
			rel.schemaErr = fmt.Errorf("%w: table %s.%s has no column %s",
				ErrSchema, d.schema, d.table, strings.Join(missing, ", "))
		}
	}
	d.relations[id] = rel
	return rel.schemaErr
}

// span is one column value inside the input buffer.
type span struct {
	kind       byte // 'n', 'u', 't', 'b'; 0 = not present
	start, end int
}

func (d *Decoder) insert(r *reader) (Message, error) {
	id := r.u32()
	if r.u8() != 'N' && !r.bad {
		return Message{}, protoErr("insert: expected new tuple ('N')")
	}
	if r.bad {
		return Message{}, protoErr("insert: truncated")
	}
	if !d.inTx {
		return Message{}, protoErr("insert outside a transaction")
	}
	rel, ok := d.relations[id]
	if !ok {
		return Message{}, protoErr(fmt.Sprintf("insert on unknown relation %d", id))
	}
	if !rel.outbox {
		if err := r.skipTuple(rel); err != nil {
			return Message{}, err
		}
		return Message{}, r.finish("insert")
	}
	if rel.schemaErr != nil {
		return Message{}, rel.schemaErr
	}

	n := int(r.u16())
	if r.bad {
		return Message{}, protoErr("insert: truncated tuple")
	}
	if n != rel.ncols {
		return Message{}, protoErr(fmt.Sprintf("insert: tuple has %d columns, relation %d has %d", n, id, rel.ncols))
	}
	var vals [numRoles]span
	var hdrs []span
	if len(d.layout.headers) > 0 {
		hdrs = make([]span, len(d.layout.headers))
	}
	for i := 0; i < n; i++ {
		s, err := r.value()
		if err != nil {
			return Message{}, err
		}
		switch role := int(rel.roles[i]); {
		case role >= numRoles:
			hdrs[role-numRoles] = s
		case role >= 0:
			vals[role] = s
		}
	}
	if err := r.finish("insert"); err != nil {
		return Message{}, err
	}
	return Message{Kind: KindEvent, Event: d.layout.buildEvent(r.buf, &vals, hdrs, d.commitTime)}, nil
}

// buildEvent copies the event out of buf. The text fields and headers
// share one allocation; the payload gets its own so the caller may keep or
// modify it. commitTime is the event's time when the layout has no
// occurred_at.
func (l *Layout) buildEvent(buf []byte, vals *[numRoles]span, hdrs []span, commitTime time.Time) Event {
	var ev Event
	if l.names[colOccurredAt] == "" && vals[colOccurredAt].kind == 0 {
		ev.OccurredAt = commitTime
	}
	for role := 0; role < numRequired; role++ {
		if ev.Invalid == "" && (role != colOccurredAt || ev.OccurredAt.IsZero()) &&
			!(role == colPayload && vals[role].kind == 'n') {
			ev.Invalid = l.valueProblem(role, vals[role].kind)
		}
	}
	if k := vals[colPublishedAt].kind; k != 0 && k != 'n' {
		ev.Published = true
	}

	textRoles := [...]int{colID, colAggregateType, colAggregateID, colEventType, colTraceparent, colTracestate}
	total := 0
	for _, role := range textRoles {
		if v := vals[role]; v.kind == 't' {
			total += v.end - v.start
		}
	}
	for _, v := range hdrs {
		if v.kind == 't' {
			total += v.end - v.start
		}
	}
	var sb strings.Builder
	sb.Grow(total)
	var bounds [len(textRoles)][2]int
	for i, role := range textRoles {
		if v := vals[role]; v.kind == 't' {
			bounds[i][0] = sb.Len()
			sb.Write(buf[v.start:v.end])
			bounds[i][1] = sb.Len()
		}
	}
	hdrBounds := make([][2]int, len(hdrs))
	for i, v := range hdrs {
		if v.kind == 't' {
			hdrBounds[i][0] = sb.Len()
			sb.Write(buf[v.start:v.end])
			hdrBounds[i][1] = sb.Len()
		}
	}
	all := sb.String()
	ev.ID = all[bounds[0][0]:bounds[0][1]]
	ev.AggregateType = all[bounds[1][0]:bounds[1][1]]
	ev.AggregateID = all[bounds[2][0]:bounds[2][1]]
	ev.EventType = all[bounds[3][0]:bounds[3][1]]
	for i, v := range hdrs {
		if v.kind == 't' {
			ev.Headers = append(ev.Headers, Header{Name: l.headers[i], Value: all[hdrBounds[i][0]:hdrBounds[i][1]]})
		}
	}
	if tp := all[bounds[4][0]:bounds[4][1]]; validTraceparent(tp) {
		ev.Traceparent = tp
		if ts := all[bounds[5][0]:bounds[5][1]]; validTracestate(ts) {
			ev.Tracestate = ts
		}
	} else if v := vals[colSpanContext]; v.kind == 't' {
		ev.Traceparent, ev.Tracestate = parseSpanContext(buf[v.start:v.end])
	}

	switch v := vals[colPayload]; v.kind {
	case 't':
		ev.Payload = bytes.Clone(buf[v.start:v.end])
		if ev.Payload == nil {
			ev.Payload = []byte{}
		}
	case 'n':
		ev.Payload, ev.Tombstone = []byte{}, true
	}

	if v := vals[colOccurredAt]; v.kind == 't' {
		text := buf[v.start:v.end]
		t, ok := parseTimestamptz(text)
		if ok {
			ev.OccurredAt = t
		} else if ev.Invalid == "" {
			if len(text) > 64 {
				text = text[:64]
			}
			ev.Invalid = fmt.Sprintf("column %q: cannot parse %q", l.orName(colOccurredAt), text)
		}
	}
	if ev.Invalid != "" {
		ev.OccurredAt = time.Time{}
	}
	return ev
}

// orName is the column of role, or the role's own name when unmapped.
func (l *Layout) orName(role int) string {
	if n := l.names[role]; n != "" {
		return n
	}
	return ColumnFields[role] // roles before colPublishedAt are in ColumnFields's order
}

func (l *Layout) valueProblem(role int, kind byte) string {
	name := l.orName(role)
	switch kind {
	case 't':
		return ""
	case 'n':
		return fmt.Sprintf("column %q is null", name)
	case 'u':
		return fmt.Sprintf("column %q is an unchanged TOAST value, not sent", name)
	case 'b':
		return fmt.Sprintf("column %q is in binary format, want text", name)
	}
	return fmt.Sprintf("column %q is missing", name)
}

func (d *Decoder) update(r *reader) error {
	id := r.u32()
	if err := d.knownChange(r, "update", id); err != nil {
		return err
	}
	rel := d.relations[id]
	switch r.u8() {
	case 'K', 'O':
		if err := r.skipTuple(rel); err != nil {
			return err
		}
		if r.u8() != 'N' && !r.bad {
			return protoErr("update: expected new tuple ('N')")
		}
	case 'N':
	default:
		if !r.bad {
			return protoErr("update: expected 'K', 'O' or 'N'")
		}
	}
	if err := r.skipTuple(rel); err != nil {
		return err
	}
	return r.finish("update")
}

func (d *Decoder) delete(r *reader) error {
	id := r.u32()
	if err := d.knownChange(r, "delete", id); err != nil {
		return err
	}
	if c := r.u8(); c != 'K' && c != 'O' && !r.bad {
		return protoErr("delete: expected 'K' or 'O'")
	}
	if err := r.skipTuple(d.relations[id]); err != nil {
		return err
	}
	return r.finish("delete")
}

func (d *Decoder) truncate(r *reader) error {
	n := r.u32()
	r.u8() // options
	if r.bad {
		return protoErr("truncate: truncated")
	}
	if uint64(n)*4 != uint64(len(r.buf)-r.pos) {
		return protoErr("truncate: relation count does not match length")
	}
	if !d.inTx {
		return protoErr("truncate outside a transaction")
	}
	return nil
}

func (d *Decoder) knownChange(r *reader, what string, id uint32) error {
	if r.bad {
		return protoErr(what + ": truncated")
	}
	if !d.inTx {
		return protoErr(what + " outside a transaction")
	}
	if _, ok := d.relations[id]; !ok {
		return protoErr(fmt.Sprintf("%s on unknown relation %d", what, id))
	}
	return nil
}

func protoErr(msg string) error {
	return fmt.Errorf("%w: %s", ErrProtocol, msg)
}

// reader reads big-endian fields. A read past the end sets bad and returns
// zero; callers check bad (or call finish) before trusting what they read.
type reader struct {
	buf []byte
	pos int
	bad bool
}

func (r *reader) fail() { r.bad = true; r.pos = len(r.buf) }

func (r *reader) take(n int) []byte {
	if r.bad || n < 0 || n > len(r.buf)-r.pos {
		r.fail()
		return nil
	}
	b := r.buf[r.pos : r.pos+n]
	r.pos += n
	return b
}

func (r *reader) skip(n int) { r.take(n) }

func (r *reader) u8() byte {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (r *reader) i32() int32 { return int32(r.u32()) }

func (r *reader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

// cstring returns a NUL-terminated string without its terminator.
func (r *reader) cstring() []byte {
	if r.bad {
		return nil
	}
	i := bytes.IndexByte(r.buf[r.pos:], 0)
	if i < 0 {
		r.fail()
		return nil
	}
	s := r.buf[r.pos : r.pos+i]
	r.pos += i + 1
	return s
}

// value reads one TupleData column.
func (r *reader) value() (span, error) {
	kind := r.u8()
	switch kind {
	case 'n', 'u':
		return span{kind: kind}, nil
	case 't', 'b':
		n := r.i32()
		if r.bad {
			return span{}, protoErr("tuple: truncated column length")
		}
		start := r.pos
		if r.take(int(n)); r.bad {
			return span{}, protoErr(fmt.Sprintf("tuple: column length %d exceeds message", n))
		}
		return span{kind: kind, start: start, end: r.pos}, nil
	}
	if r.bad {
		return span{}, protoErr("tuple: truncated")
	}
	return span{}, protoErr(fmt.Sprintf("tuple: unknown column kind %q", rune(kind)))
}

// skipTuple checks and skips a TupleData of a relation.
func (r *reader) skipTuple(rel *relation) error {
	n := int(r.u16())
	if r.bad {
		return protoErr("tuple: truncated")
	}
	if n != rel.ncols {
		return protoErr(fmt.Sprintf("tuple has %d columns, relation has %d", n, rel.ncols))
	}
	for i := 0; i < n; i++ {
		if _, err := r.value(); err != nil {
			return err
		}
	}
	return nil
}

// finish reports a truncated message or trailing bytes.
func (r *reader) finish(what string) error {
	if r.bad {
		return protoErr(what + ": truncated")
	}
	if r.pos != len(r.buf) {
		return protoErr(fmt.Sprintf("%s: %d trailing bytes", what, len(r.buf)-r.pos))
	}
	return nil
}

// pgTime converts microseconds since 2000-01-01 00:00:00 UTC.
func pgTime(us int64) time.Time {
	const y2k = 946684800 // 2000-01-01 in Unix seconds
	sec, rem := us/1e6, us%1e6
	if rem < 0 {
		rem += 1e6
		sec--
	}
	return time.Unix(sec+y2k, rem*1e3).UTC()
}

// parseTimestamptz parses PostgreSQL's ISO timestamptz output,
// "YYYY-MM-DD HH:MM:SS[.fffffff][+-]HH[:MM[:SS]]", with years of four or
// more digits, or a timestamp's without the offset (taken as UTC). infinity, -infinity and BC dates are rejected. The result is
// in UTC and allocation-free.
func parseTimestamptz(b []byte) (time.Time, bool) {
	p := tsParser{b: b}
	// Year: 4 to 7 digits (PostgreSQL's maximum is 294276).
	year, nd := 0, 0
	for p.i < len(b) && nd < 8 && isDigit(b[p.i]) {
		year = year*10 + int(b[p.i]-'0')
		p.i++
		nd++
	}
	if nd < 4 || nd > 7 || year == 0 || !p.lit('-') {
		return time.Time{}, false
	}
	month := p.num2()
	if !p.lit('-') {
		return time.Time{}, false
	}
	day := p.num2()
	if !p.lit(' ') && !p.lit('T') {
		return time.Time{}, false
	}
	hour := p.num2()
	if !p.lit(':') {
		return time.Time{}, false
	}
	minute := p.num2()
	if !p.lit(':') {
		return time.Time{}, false
	}
	sec := p.num2()
	nsec := 0
	if p.lit('.') {
		nd := 0
		for p.i < len(b) && isDigit(b[p.i]) {
			if nd == 9 {
				return time.Time{}, false
			}
			nsec = nsec*10 + int(b[p.i]-'0')
			p.i++
			nd++
		}
		if nd == 0 {
			return time.Time{}, false
		}
		for ; nd < 9; nd++ {
			nsec *= 10
		}
	}
	// Offset east of UTC, in seconds.
	off := 0
	if p.i == len(b) {
		// No offset: a timestamp without time zone (a column RELAY_COLUMNS
		// maps), read as UTC.
	} else if p.lit('Z') {
		// accepted for robustness; PostgreSQL writes +00
	} else {
		var sign int
		switch {
		case p.lit('+'):
			sign = 1
		case p.lit('-'):
			sign = -1
		default:
			return time.Time{}, false
		}
		oh := p.num2()
		om, os := 0, 0
		if p.lit(':') {
			om = p.num2()
			if p.lit(':') {
				os = p.num2()
			}
		}
		if oh > 15 || om > 59 || os > 59 {
			return time.Time{}, false
		}
		off = sign * (oh*3600 + om*60 + os)
	}
	if p.bad || p.i != len(b) {
		return time.Time{}, false
	}
	if month < 1 || month > 12 || day < 1 || day > daysIn(month, year) ||
		hour > 23 || minute > 59 || sec > 59 {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.UTC)
	return t.Add(-time.Duration(off) * time.Second), true
}

type tsParser struct {
	b   []byte
	i   int
	bad bool
}

func (p *tsParser) lit(c byte) bool {
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *tsParser) num2() int {
	if p.i+2 > len(p.b) || !isDigit(p.b[p.i]) || !isDigit(p.b[p.i+1]) {
		p.bad = true
		return 0
	}
	v := int(p.b[p.i]-'0')*10 + int(p.b[p.i+1]-'0')
	p.i += 2
	return v
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func daysIn(month, year int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}
