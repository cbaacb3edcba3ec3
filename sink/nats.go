package sink

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/textproto"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// NATSConfig configures the NATS JetStream publisher. The subject of each
// message is its Key, rendered by the relay from RELAY_ROUTING_KEY.
type NATSConfig struct {
	URL string
	// Stream must capture every subject the relay publishes to. When it is
	// missing it is created with StreamSubjects, file storage, limits
	// retention and DuplicateWindow; an existing stream is used as it is,
	// after checking that it captures StreamSubjects.
	Stream         string
	StreamSubjects []string
	// DeadLetterStream captures DeadLetterSubject, created the same way.
	DeadLetterStream  string
	DeadLetterSubject string
	// DuplicateWindow is how long JetStream remembers a Nats-Msg-Id, in
	// streams the relay creates; 0 means 2 minutes.
	DuplicateWindow time.Duration
	// MaxMessageBytes caps header plus payload below the server's
	// max_payload; 0 means the server's limit only.
	MaxMessageBytes int
	// MaxPending caps publishes awaiting their ack; a Publish beyond it
	// waits up to AckTimeout. Set it above the relay's window; 0 means 4096.
	MaxPending int
	// AckTimeout bounds the wait for one ack; 0 means 30 seconds.
	AckTimeout     time.Duration
	ConnectionName string
	// CloudEvents adds the CloudEvents attributes as ce- headers (the NATS
	// binding's binary content mode).
	CloudEvents bool
	// CloudEventsSource is the CloudEvents source attribute.
	CloudEventsSource string
}

// NATS publishes to JetStream with asynchronous publish acks.
type NATS struct {
	cfg        NATSConfig
	nc         *nats.Conn
	js         jetstream.JetStream
	maxPayload int // header plus payload, the smaller of ours and the server's

	closed    chan struct{}
	closeOnce sync.Once
	mu        sync.Mutex
	closeErr  error

	rawMu       sync.Mutex
	raw         net.Conn // the socket under nc
	interrupted atomic.Bool
	interrupts  *interrupter // calls interrupt when their context ends mid-call

	// measured is the message Reject built to measure its Message, handed
	// to the Publish of that Message that follows so that it is not built
	// twice. Reject and Publish are the publishing goroutine's only.
	measured struct {
		for_ *Message
		msg  *nats.Msg
	}
}

// Header names of the NATS message format (docs/sinks.md).
const (
	natsHeaderAggregateType = "aggregate_type"
	natsHeaderAggregateID   = "aggregate_id"
	natsHeaderOccurredAt    = "occurred_at"
	natsHeaderType          = "type"
	natsHeaderContentType   = "Content-Type"
	natsHeaderReason        = "Outbox-Reason"
	natsHeaderSubject       = "Outbox-Subject"
	natsHeaderOmitted       = "Outbox-Payload-Omitted"
)

// maxSubjectBytes keeps a PUB line well inside the server's default
// max_control_line (4 KiB): a longer one closes the connection.
const maxSubjectBytes = 1024

// ErrNATSClosed reports a NATS connection that went away.
var ErrNATSClosed = errors.New("NATS connection closed")

// DialNATS connects, makes sure both streams exist and returns a publisher.
// The connection does not reconnect by itself: a lost connection is an
// error from Publish or Wait, and the relay reconnects and republishes.
func DialNATS(ctx context.Context, cfg NATSConfig) (*NATS, error) {
	if cfg.DuplicateWindow == 0 {
		cfg.DuplicateWindow = 2 * time.Minute
	}
	if cfg.MaxPending == 0 {
		cfg.MaxPending = 4096
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = 30 * time.Second
	}
	if cfg.ConnectionName == "" {
		cfg.ConnectionName = "outbox-relay"
	}
	if cfg.Stream == "" || len(cfg.StreamSubjects) == 0 || cfg.DeadLetterStream == "" || cfg.DeadLetterSubject == "" {
		return nil, errors.New("NATS: Stream, StreamSubjects, DeadLetterStream and DeadLetterSubject are required")
	}
	if cfg.CloudEvents && cfg.CloudEventsSource == "" {
		return nil, errors.New("NATS: CloudEvents needs a CloudEventsSource")
	}
	n := &NATS{cfg: cfg, closed: make(chan struct{})}
	n.interrupts = newInterrupter(n.interrupt)
	nc, err := nats.Connect(cfg.URL,
		nats.Name(cfg.ConnectionName),
		nats.NoReconnect(),
		nats.Timeout(15*time.Second),
		nats.SetCustomDialer(ctxDialer{ctx, n}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { n.setCloseErr(err) }),
		nats.ClosedHandler(func(*nats.Conn) { n.closeOnce.Do(func() { close(n.closed) }) }),
	)
	if err != nil {
		// nats.go's errors do not include the URL, so no password leaks.
		return nil, fmt.Errorf("connect to NATS: %w", err)
	}
	n.nc = nc
	n.js, err = jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(cfg.MaxPending),
		jetstream.WithPublishAsyncTimeout(cfg.AckTimeout))
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("NATS JetStream: %w", err)
	}
	n.maxPayload = int(nc.MaxPayload())
	if cfg.MaxMessageBytes > 0 && cfg.MaxMessageBytes < n.maxPayload {
		n.maxPayload = cfg.MaxMessageBytes
	}
	streamMax, err := n.ensureStream(ctx, cfg.Stream, cfg.StreamSubjects, "outbox-relay: outbox events")
	if err == nil {
		_, err = n.ensureStream(ctx, cfg.DeadLetterStream, []string{cfg.DeadLetterSubject}, "outbox-relay: events the relay could not publish")
	}
	if err != nil {
		nc.Close()
		return nil, err
	}
	if streamMax > 0 && streamMax < n.maxPayload {
		n.maxPayload = streamMax
	}
	return n, nil
}

// ctxDialer makes the connect honour ctx, and keeps the socket so that a
// write blocked on a server that stopped reading can be cut off.
type ctxDialer struct {
	ctx context.Context
	n   *NATS
}

func (d ctxDialer) Dial(network, address string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(d.ctx, network, address)
	if err == nil {
		d.n.rawMu.Lock()
		d.n.raw = c
		d.n.rawMu.Unlock()
	}
	return c, err
}

func (n *NATS) socket() net.Conn {
	n.rawMu.Lock()
	defer n.rawMu.Unlock()
	return n.raw
}

// interrupt makes a write blocked in the socket, and every later one, fail
// at once. nats.go writes with its connection lock held, for up to a
// minute (FlusherTimeout), and Publish waits for that lock without looking
// at any context; so a server that stops reading would hold a stopping
// relay that long.
func (n *NATS) interrupt() {
	n.interrupted.Store(true)
	if c := n.socket(); c != nil {
		_ = c.SetWriteDeadline(time.Unix(1, 0))
	}
}

// ensureStream creates the stream when it is missing and checks that an
// existing one captures subjects. It returns the stream's max_msg_size.
func (n *NATS) ensureStream(ctx context.Context, name string, subjects []string, desc string) (int, error) {
	s, err := n.js.Stream(ctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		s, err = n.js.CreateStream(ctx, jetstream.StreamConfig{
			Name:        name,
			Description: desc,
			Subjects:    subjects,
			Storage:     jetstream.FileStorage,
			Retention:   jetstream.LimitsPolicy,
			Duplicates:  n.cfg.DuplicateWindow,
		})
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			s, err = n.js.Stream(ctx, name) // another relay created it just now
		}
		if err != nil {
			return 0, fmt.Errorf("create JetStream stream %q for %v: %w", name, subjects, err)
		}
	} else if err != nil {
		return 0, fmt.Errorf("look up JetStream stream %q: %w", name, err)
	}
	cfg := s.CachedInfo().Config
	for _, want := range subjects {
		if !captures(cfg.Subjects, want) {
			return 0, fmt.Errorf("JetStream stream %q exists but does not capture %q (its subjects are %v): "+
				"add the subject to the stream or choose another stream name", name, want, cfg.Subjects)
		}
	}
	return int(cfg.MaxMsgSize), nil
}

// captures reports whether one of the filters matches every subject that
// want matches.
func captures(filters []string, want string) bool {
	for _, f := range filters {
		if covers(f, want) {
			return true
		}
	}
	return false
}

func covers(filter, want string) bool {
	f, w := strings.Split(filter, "."), strings.Split(want, ".")
	for i, tok := range f {
		switch {
		case tok == ">":
			return i < len(w) // one or more tokens, whatever they are
		case i >= len(w), tok == "*" && w[i] == ">", tok != "*" && tok != w[i]:
			return false
		}
	}
	return len(f) == len(w)
}

func (n *NATS) setCloseErr(err error) {
	if err == nil {
		return
	}
	n.mu.Lock()
	if n.closeErr == nil {
		n.closeErr = err
	}
	n.mu.Unlock()
}

func (n *NATS) closedErr() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closeErr != nil {
		return fmt.Errorf("%w: %w", ErrNATSClosed, n.closeErr)
	}
	return ErrNATSClosed
}

// ValidSubject returns why s cannot be published to, or "".
func ValidSubject(s string) string {
	if s == "" {
		return "subject is empty"
	}
	if len(s) > maxSubjectBytes {
		return fmt.Sprintf("subject is %d bytes; the relay allows at most %d", len(s), maxSubjectBytes)
	}
	for _, tok := range strings.Split(s, ".") {
		switch {
		case tok == "":
			return fmt.Sprintf("subject %q has an empty token", s)
		case tok == "*" || tok == ">":
			return fmt.Sprintf("subject %q contains the wildcard %q", s, tok)
		case strings.ContainsAny(tok, " \t\r\n\f\v\x00"):
			return fmt.Sprintf("subject %q contains white space", s)
		}
	}
	return ""
}

// natsCEPrefix prefixes the CloudEvents attributes in the NATS binding's
// binary content mode, datacontenttype included (ce-datacontenttype).
const natsCEPrefix = "ce-"

// natsReserved reports a header name the sink sets itself (NATS header
// names compare case-insensitively); a header column of that name is not
// sent (config refuses such columns).
func natsReserved(name string) bool {
	for _, r := range []string{jetstream.MsgIDHeader, natsHeaderType, natsHeaderContentType, natsHeaderAggregateType,
		natsHeaderAggregateID, natsHeaderOccurredAt, headerTraceparent, headerTracestate, headerTombstone} {
		if strings.EqualFold(name, r) {
			return true
		}
	}
	l := strings.ToLower(name)
	return strings.HasPrefix(l, natsCEPrefix) || strings.HasPrefix(l, "outbox-")
}

// natsMessage is the message the sink publishes for m to subject: the
// contract's headers, m's header columns under their names, traceparent
// and tracestate when set, tombstone: true (and no Content-Type) for a
// tombstone, and with CloudEvents the ce- attributes.
func (n *NATS) natsMessage(subject string, m *Message) *nats.Msg {
	occurred := m.OccurredAt.UTC().Format(time.RFC3339Nano)
	h := nats.Header{
		jetstream.MsgIDHeader:   {m.ID},
		natsHeaderType:          {m.Type},
		natsHeaderAggregateType: {m.AggregateType},
		natsHeaderAggregateID:   {m.AggregateID},
		natsHeaderOccurredAt:    {occurred},
	}
	eachColumn(m, natsReserved, strings.EqualFold, func(c decoder.Header) { h[c.Name] = []string{c.Value} })
	if m.Traceparent != "" {
		h[headerTraceparent] = []string{m.Traceparent}
	}
	if m.Tracestate != "" {
		h[headerTracestate] = []string{m.Tracestate}
	}
	if m.Tombstone {
		h[headerTombstone] = []string{"true"}
	} else {
		h[natsHeaderContentType] = []string{amqpContentType}
	}
	if n.cfg.CloudEvents {
		// Values percent-encoded, as the binding requires: they then never
		// hold what a NATS header cannot carry.
		ce := func(attr, v string) { h[natsCEPrefix+attr] = []string{cePercentEncode(v)} }
		ce("specversion", ceSpecVersion)
		ce("id", m.ID)
		ce("type", m.Type)
		ce("source", n.cfg.CloudEventsSource)
		if m.AggregateID != "" {
			ce("subject", m.AggregateID)
		}
		if !m.OccurredAt.IsZero() {
			ce("time", occurred)
		}
		if !m.Tombstone {
			ce("datacontenttype", amqpContentType)
		}
	}
	return &nats.Msg{Subject: subject, Header: h, Data: m.Body}
}

// cePercentEncode encodes v as the CloudEvents NATS binding says: space,
// double quote, percent and every byte outside printable ASCII as %XY.
func cePercentEncode(v string) string {
	const hex = "0123456789ABCDEF"
	plain := func(c byte) bool { return c > ' ' && c < 0x7f && c != '"' && c != '%' }
	i := 0
	for i < len(v) && plain(v[i]) {
		i++
	}
	if i == len(v) {
		return v
	}
	b := make([]byte, i, len(v)+16)
	copy(b, v[:i])
	for ; i < len(v); i++ {
		if c := v[i]; plain(c) {
			b = append(b, c)
		} else {
			b = append(b, '%', hex[c>>4], hex[c&15])
		}
	}
	return string(b)
}

// Reject implements Publisher: invalid subjects, header values that NATS
// cannot carry as they are, and messages bigger than the server's
// max_payload (which would close the connection), the stream's
// max_msg_size or MaxMessageBytes.
func (n *NATS) Reject(m *Message) string {
	if n.cfg.CloudEvents && m.Type == "" {
		return ceEmptyType
	}
	if reason := ValidSubject(m.Key); reason != "" {
		return reason
	}
	msg := n.natsMessage(m.Key, m)
	for _, k := range natsMessageHeaders {
		if why := headerValueProblem(msg.Header.Get(k)); why != "" {
			return fmt.Sprintf("header %s (%s) %s; NATS headers cannot carry it as it is", k, natsHeaderSource[k], why)
		}
	}
	var bad string
	eachColumn(m, natsReserved, strings.EqualFold, func(c decoder.Header) {
		if why := headerValueProblem(c.Value); why != "" && bad == "" {
			bad = fmt.Sprintf("header column %s %s; NATS headers cannot carry it as it is", c.Name, why)
		}
	})
	if bad != "" {
		return bad
	}
	for _, k := range []string{headerTraceparent, headerTracestate} {
		if why := headerValueProblem(msg.Header.Get(k)); why != "" {
			return fmt.Sprintf("header %s (the trace context) %s; NATS headers cannot carry it as it is", k, why)
		}
	}
	if size := headerSize(msg.Header); size > maxHeaderBytes {
		what := "id, aggregate_type, aggregate_id, event_type"
		if len(m.Headers) > 0 {
			what += "; header columns (bytes): " + columnNames(m, func(h decoder.Header) int { return len(h.Value) }, 10)
		}
		if m.Traceparent != "" || m.Tracestate != "" {
			what += "; traceparent, tracestate"
		}
		return fmt.Sprintf("headers are %d bytes (%s); JetStream allows at most %d", size, what, maxHeaderBytes)
	}
	if size := msg.Size() - len(msg.Subject); size > n.maxPayload {
		// Not kept: a rejected message is dead-lettered, never published,
		// and a kept one would hold its payload until the item is gone.
		return fmt.Sprintf("message is %d bytes with its headers; the limit is %d (the smallest of the server's max_payload, "+
			"the stream's max_msg_size and RELAY_MAX_MESSAGE_BYTES)", size, n.maxPayload)
	}
	n.measured.for_, n.measured.msg = m, msg
	return ""
}

// maxHeaderBytes is JetStream's limit on a message's headers: a bigger
// message is refused with err_code 10097 ("header size exceeds maximum
// allowed of 64k"), which is no verdict the relay could act on.
const maxHeaderBytes = 65535

// headerSize is the size of h as nats.go encodes it.
func headerSize(h nats.Header) int {
	n := len("NATS/1.0\r\n") + len("\r\n")
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(": ") + len(textproto.TrimString(v)) + len("\r\n")
		}
	}
	return n
}

// natsMessageHeaders are the headers natsMessage fills from the row.
var natsMessageHeaders = []string{jetstream.MsgIDHeader, natsHeaderType, natsHeaderAggregateType, natsHeaderAggregateID}

var natsHeaderSource = map[string]string{
	jetstream.MsgIDHeader: "the id", natsHeaderType: "the event_type",
	natsHeaderAggregateType: "the aggregate_type", natsHeaderAggregateID: "the aggregate_id",
}

// headerValueProblem says why v would not arrive as it is in a NATS header,
// or "". nats.go replaces CR and LF with spaces and trims leading and
// trailing white space; other control characters break readers that follow
// the header format (ADR-4, Go's textproto).
func headerValueProblem(v string) string {
	if textproto.TrimString(v) != v {
		return "has leading or trailing white space"
	}
	if strings.ContainsAny(v, "\r\n") {
		return "contains a line break (CR or LF, which nats.go would replace with a space)"
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 && c != '\t' || c == 0x7f {
			return fmt.Sprintf("contains the control character %q", c)
		}
	}
	return ""
}

type natsPending struct {
	n   *NATS
	paf jetstream.PubAckFuture
	m   *Message
}

// Publish implements Publisher. It waits only when MaxPending publishes are
// unacknowledged.
func (n *NATS) Publish(ctx context.Context, m *Message) (Pending, error) {
	select {
	case <-n.closed:
		return nil, fmt.Errorf("publish %s: %w", m.ID, n.closedErr())
	default:
	}
	msg := n.measured.msg
	if n.measured.for_ != m || msg == nil || msg.Subject != m.Key {
		msg = n.natsMessage(m.Key, m)
	}
	// A republish builds afresh: the library keeps the one it was given.
	n.measured.for_, n.measured.msg = nil, nil
	defer n.interrupts.during(ctx)()
	paf, err := n.publishAsync(ctx, msg)
	if err != nil {
		if n.nc.IsClosed() {
			return nil, fmt.Errorf("publish %s: %w", m.ID, n.closedErr())
		}
		return nil, fmt.Errorf("publish %s to %q: %w", m.ID, m.Key, err)
	}
	return &natsPending{n: n, paf: paf, m: m}, nil
}

// stallStep is how long one attempt waits for room below MaxPending, so
// that a cancelled context is noticed.
const stallStep = 100 * time.Millisecond

// publishAsync publishes msg, waiting up to AckTimeout, or until ctx ends,
// for room below MaxPending.
func (n *NATS) publishAsync(ctx context.Context, msg *nats.Msg) (jetstream.PubAckFuture, error) {
	deadline := time.Now().Add(n.cfg.AckTimeout)
	for {
		// No retries on "no responders": the library would republish
		// later, out of order; Wait decides instead.
		paf, err := n.js.PublishMsgAsync(msg,
			jetstream.WithRetryAttempts(0), jetstream.WithStallWait(min(stallStep, n.cfg.AckTimeout)))
		if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) || !time.Now().Before(deadline) {
			return paf, err
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// Wait implements Pending. An ack for a message id the stream already
// holds (JetStream's deduplication) is Acked with Duplicate set.
func (p *natsPending) Wait(ctx context.Context) (Result, error) {
	select {
	case ack := <-p.paf.Ok():
		return Result{Outcome: Acked, Duplicate: ack.Duplicate}, nil
	case err := <-p.paf.Err():
		return p.n.verdict(ctx, p.m, err)
	case <-p.n.closed:
		// The ack may have arrived just before the close.
		select {
		case ack := <-p.paf.Ok():
			return Result{Outcome: Acked, Duplicate: ack.Duplicate}, nil
		default:
		}
		return Result{}, fmt.Errorf("publish ack of %s: %w", p.m.ID, p.n.closedErr())
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// verdict classifies a failed publish. Only two failures are the broker's
// verdict on the message; every other one (timeouts, a lost connection,
// JetStream unavailable or out of resources) is an error, after which the
// relay reconnects and republishes, and deduplication absorbs the repeats.
func (n *NATS) verdict(ctx context.Context, m *Message, err error) (Result, error) {
	var apiErr *jetstream.APIError
	switch {
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		// No responders: no stream captures the subject, or JetStream is
		// unavailable right now. Ask which.
		name, lerr := n.js.StreamNameBySubject(ctx, m.Key)
		if errors.Is(lerr, jetstream.ErrStreamNotFound) {
			return Result{Outcome: Returned, Reason: fmt.Sprintf("no JetStream stream captures subject %q", m.Key)}, nil
		}
		if lerr != nil {
			return Result{}, fmt.Errorf("publish %s to %q: %w (and the stream lookup failed: %w)", m.ID, m.Key, err, lerr)
		}
		return Result{}, fmt.Errorf("publish %s to %q: stream %q did not answer: %w", m.ID, m.Key, name, err)
	case errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamMessageExceedsMaximum:
		return Result{Outcome: Nacked, Reason: apiErr.Error(), Permanent: true}, nil
	case n.nc.IsClosed():
		return Result{}, fmt.Errorf("publish ack of %s: %w", m.ID, n.closedErr())
	}
	return Result{}, fmt.Errorf("publish ack of %s: %w", m.ID, err)
}

// DeadLetter implements Publisher: it publishes m to DeadLetterSubject with
// the reason and waits for the ack. The message id is kept, so a repeated
// dead-letter after a crash is deduplicated too.
//
// The copy can never be refused for anything in the message (invariant 8):
// see deadLetterMessage.
func (n *NATS) DeadLetter(ctx context.Context, m *Message, reason string) error {
	msg := n.deadLetterMessage(m, reason)
	ctx, cancel := context.WithTimeout(ctx, n.cfg.AckTimeout)
	defer cancel()
	defer n.interrupts.once(ctx)()
	if _, err := n.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(n.cfg.DeadLetterStream), jetstream.WithRetryAttempts(0)); err != nil {
		if n.nc.IsClosed() {
			return fmt.Errorf("dead-letter %s: %w", m.ID, n.closedErr())
		}
		return fmt.Errorf("dead-letter %s to %q: %w", m.ID, n.cfg.DeadLetterSubject, err)
	}
	return nil
}

// Headers that say how a dead-letter copy differs from the message.
const (
	// natsHeaderQuoted lists the headers whose values NATS could not carry
	// as they are (headerValueProblem): each holds the Go-quoted value.
	natsHeaderQuoted = "Outbox-Quoted"
	// natsHeaderCut lists the headers whose values were cut so that the
	// message fits the size limit.
	natsHeaderCut = "Outbox-Cut"
	// natsHeaderDropped lists the trace headers and header columns left
	// out because even cut the headers do not fit (very many header
	// columns): then all of them are left out, and the list itself may be
	// cut.
	natsHeaderDropped = "Outbox-Dropped"
)

// deadLetterMessage is the dead-letter copy of m: header values NATS cannot
// carry are quoted, the payload is left out when the message is over the
// size limit, and then the longest header values are cut (at a UTF-8
// boundary) until it fits; when the headers do not fit even cut, the header
// columns and trace headers are left out. Headers say which of these
// happened.
func (n *NATS) deadLetterMessage(m *Message, reason string) *nats.Msg {
	msg := n.natsMessage(n.cfg.DeadLetterSubject, m)
	msg.Header[natsHeaderReason] = []string{reason}
	msg.Header[natsHeaderSubject] = []string{m.Key}
	var quoted []string
	for k, vs := range msg.Header {
		if headerValueProblem(vs[0]) != "" {
			msg.Header[k] = []string{strconv.QuoteToASCII(vs[0])}
			quoted = append(quoted, k)
		}
	}
	if len(quoted) > 0 {
		sort.Strings(quoted)
		msg.Header[natsHeaderQuoted] = []string{strings.Join(quoted, ",")}
	}
	whole := maps.Clone(msg.Header)
	if n.fit(msg) {
		return msg
	}
	// Too many headers to fit even cut, or too many cut to list: leave out
	// the header columns and the trace headers, and cut the rest.
	msg.Header, msg.Data = whole, m.Body
	var dropped []string
	drop := func(k string) {
		if _, ok := whole[k]; ok {
			delete(whole, k)
			dropped = append(dropped, k)
		}
	}
	drop(headerTraceparent)
	drop(headerTracestate)
	eachColumn(m, natsReserved, strings.EqualFold, func(c decoder.Header) { drop(c.Name) })
	whole[natsHeaderDropped] = []string{strings.Join(dropped, ",")}
	n.fit(msg)
	return msg
}

// fit makes msg fit the size limits, with room for the headers that say
// what it did: it leaves out the payload when the message is over the size
// limit, then cuts the longest header values; it reports whether the
// result fits.
func (n *NATS) fit(msg *nats.Msg) bool {
	// Room for the Outbox-Cut and Outbox-Payload-Omitted headers.
	limit := n.maxPayload - 256
	if msg.Size()-len(msg.Subject) > limit {
		// The server would refuse the body too: dead-letter the facts only.
		msg.Data = nil
		msg.Header[natsHeaderOmitted] = []string{"true"}
	}
	over := func() int {
		return max(msg.Size()-len(msg.Subject)-limit, headerSize(msg.Header)-(maxHeaderBytes-256))
	}
	cut := map[string]bool{}
	for excess := over(); excess > 0; excess = over() {
		longest, l := "", -1
		for k, vs := range msg.Header {
			if len(vs[0]) > l || len(vs[0]) == l && k < longest {
				longest, l = k, len(vs[0])
			}
		}
		if l <= 0 {
			break // nothing left to cut: the caller drops headers
		}
		// Cutting may expose trailing white space, which nats.go would trim.
		v := strings.TrimRight(cutUTF8(msg.Header[longest][0], max(0, l-excess)), " \t")
		msg.Header[longest] = []string{v}
		cut[longest] = true
	}
	if len(cut) > 0 {
		names := make([]string, 0, len(cut))
		for k := range cut {
			names = append(names, k)
		}
		sort.Strings(names)
		msg.Header[natsHeaderCut] = []string{strings.Join(names, ",")}
	}
	return msg.Size()-len(msg.Subject) <= n.maxPayload && headerSize(msg.Header) <= maxHeaderBytes
}

// Close implements Publisher.
//
// It returns within about two closeTimeouts whatever the server does:
// nats.go flushes its buffer on close, for up to a minute on a server
// that does not read, so after closeTimeout the socket is closed under it.
func (n *NATS) Close() error {
	if n.interrupted.Load() {
		if c := n.socket(); c != nil {
			_ = c.Close() // a write was cut off: nothing more can be sent
		}
	}
	done := make(chan struct{})
	go func() {
		n.nc.Close()
		close(done)
	}()
	t := time.NewTimer(closeTimeout)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
	}
	if c := n.socket(); c != nil {
		_ = c.Close()
	}
	t.Reset(closeTimeout)
	select {
	case <-done:
		return fmt.Errorf("close NATS connection: its buffer was not written within %s; closed the socket", closeTimeout)
	case <-t.C:
		return fmt.Errorf("close NATS connection: not closed %s after the socket was closed", closeTimeout)
	}
}
