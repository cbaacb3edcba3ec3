package sink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/url"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// RabbitMQConfig configures the RabbitMQ publisher.
type RabbitMQConfig struct {
	URL string // one node; ignored when Nodes is set
	// Nodes are a cluster's node URLs, shared by every dial of one relay
	// (NewNodes); nil dials URL alone.
	Nodes              *Nodes
	Exchange           string // durable topic exchange, declared if missing
	DeadLetterExchange string // durable fanout exchange with a queue of the same name
	// DeadLetterQueueType is the type of that queue: QueueClassic (also
	// "") or QueueQuorum (x-queue-type: quorum, replicated over a
	// cluster's nodes).
	DeadLetterQueueType string
	MaxMessageBytes     int
	TLS                 *tls.Config   // for amqps://; nil uses the system roots
	Heartbeat           time.Duration // AMQP heartbeat; a silent broker is detected within about twice this
	ConnectionName      string
	// OnBlocked receives RabbitMQ's connection.blocked and
	// connection.unblocked notifications (a resource alarm: publishes
	// wait until it clears), and an unblock when a blocked connection
	// closes; may be nil. It is called from one goroutine per connection.
	OnBlocked func(blocked bool, reason string)
	// OnConnection is told of each connection to a node (host:port): up
	// once its topology is declared and confirms are on, and not up once
	// it has closed; may be nil.
	OnConnection func(node string, up bool)
	// CloudEvents adds the CloudEvents attributes as headers, in the AMQP
	// binding's binary content mode (cloudEvents_ application properties;
	// datacontenttype is the content_type property).
	CloudEvents bool
	// CloudEventsSource is the CloudEvents source attribute.
	CloudEventsSource string
}

// Nodes is the list of a RabbitMQ cluster's node URLs. A dial tries them
// in turn from where the last one left off: the first dial starts at a
// random node, and each later one (a new session, after a lost
// connection) starts at the node after the one the last connection was
// on, so a relay moves on from a node that failed it.
type Nodes struct {
	urls []string
	next atomic.Int64
}

// NewNodes returns the list, its first dial starting at a random node.
func NewNodes(urls []string) *Nodes {
	n := &Nodes{urls: urls}
	if len(urls) > 1 {
		n.next.Store(rand.Int64N(int64(len(urls))))
	}
	return n
}

// NodeAddr is a node URL's host:port, the name the relay logs it by (never
// its credentials).
func NodeAddr(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "(unparsable URL)"
	}
	if u.Port() == "" {
		port := "5672"
		if u.Scheme == "amqps" {
			port = "5671"
		}
		return net.JoinHostPort(u.Hostname(), port)
	}
	return u.Host
}

// RabbitMQ publishes with confirms on one channel.
type RabbitMQ struct {
	cfg     RabbitMQConfig
	node    string // host:port of the node this connection is on
	conn    *amqp.Connection
	wire    *coalescingConn
	ch      *amqp.Channel
	returns chan amqp.Return
	closed  chan *amqp.Error // connection or channel closed

	// returned holds message ids the broker returned whose confirmation has
	// not been waited for yet. Only the Wait goroutine touches it.
	returned map[string]string
	mu       sync.Mutex // serialises Wait's use of returned with DeadLetter

	blocked atomic.Bool // between connection.blocked and connection.unblocked
	// interrupt cuts off a write blocked on a broker that stopped reading
	// when the context of the call ends (see interrupter).
	interrupt *interrupter
}

// maxShortString is AMQP's limit on a shortstr: the routing key and the
// type and message_id properties.
const maxShortString = 255

// DialRabbitMQ connects, declares the topology and enables confirms.
func DialRabbitMQ(ctx context.Context, cfg RabbitMQConfig) (*RabbitMQ, error) {
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = 10 * time.Second
	}
	if cfg.ConnectionName == "" {
		cfg.ConnectionName = "outbox-relay"
	}
	if cfg.CloudEvents && cfg.CloudEventsSource == "" {
		return nil, errors.New("RabbitMQ: CloudEvents needs a CloudEventsSource")
	}
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName(cfg.ConnectionName)
	nodes := cfg.Nodes
	if nodes == nil || len(nodes.urls) == 0 {
		nodes = &Nodes{urls: []string{cfg.URL}}
	}
	var (
		conn *amqp.Connection
		wire *coalescingConn
		node string
		errs []error
	)
	start := int(nodes.next.Load())
	for k := range nodes.urls {
		i := (start + k) % len(nodes.urls)
		var err error
		node = NodeAddr(nodes.urls[i])
		if conn, wire, err = dial(ctx, cfg, nodes.urls[i], props); err == nil {
			nodes.next.Store(int64((i + 1) % len(nodes.urls)))
			break
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		errs = append(errs, fmt.Errorf("node %s: %w", node, err))
	}
	if conn == nil {
		if len(errs) == 1 {
			return nil, errs[0]
		}
		return nil, fmt.Errorf("no RabbitMQ node of %d answered: %w", len(errs), errors.Join(errs...))
	}
	r := &RabbitMQ{
		cfg:      cfg,
		node:     node,
		conn:     conn,
		wire:     wire,
		returns:  make(chan amqp.Return, 1024),
		closed:   make(chan *amqp.Error, 2),
		returned: make(map[string]string),
	}
	r.interrupt = newInterrupter(wire.interrupt)
	if err := r.setup(); err != nil {
		conn.Close()
		return nil, err
	}
	return r, nil
}

// Node is the host:port of the node the connection is on.
func (r *RabbitMQ) Node() string { return r.node }

func dial(ctx context.Context, cfg RabbitMQConfig, rawURL string, props amqp.Table) (*amqp.Connection, *coalescingConn, error) {
	type result struct {
		conn *amqp.Connection
		wire *coalescingConn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		var wire *coalescingConn
		tcp := amqp.DefaultDial(15 * time.Second)
		// A copy for each dial: amqp091 writes the URL's host into an
		// empty ServerName, which would check every later node of the
		// list against the first one's name.
		tlsCfg := cfg.TLS
		if tlsCfg != nil {
			tlsCfg = tlsCfg.Clone()
		}
		c, err := amqp.DialConfig(rawURL, amqp.Config{
			Heartbeat:       cfg.Heartbeat,
			Locale:          "en_US",
			Properties:      props,
			TLSClientConfig: tlsCfg,
			// Below TLS, if any: held writes become one TCP write.
			Dial: func(network, addr string) (net.Conn, error) {
				c, err := tcp(network, addr)
				if err != nil {
					return nil, err
				}
				wire = newCoalescingConn(c)
				return wire, nil
			},
		})
		done <- result{c, wire, err}
	}()
	select {
	case res := <-done:
		if res.err != nil {
			// amqp091's errors do not include the URL, so no password leaks.
			return nil, nil, fmt.Errorf("connect to RabbitMQ: %w", res.err)
		}
		return res.conn, res.wire, nil
	case <-ctx.Done():
		go func() {
			if res := <-done; res.conn != nil {
				res.conn.Close()
			}
		}()
		return nil, nil, ctx.Err()
	}
}

func (r *RabbitMQ) setup() error {
	ch, err := r.conn.Channel()
	if err != nil {
		return fmt.Errorf("open RabbitMQ channel: %w", err)
	}
	r.ch = ch
	if err := ch.ExchangeDeclare(r.cfg.Exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %q (durable topic): %w", r.cfg.Exchange, err)
	}
	// Declarations that fail close the channel, so each gets a fresh one.
	if ch, err = r.conn.Channel(); err != nil {
		return fmt.Errorf("open RabbitMQ channel: %w", err)
	}
	r.ch = ch
	dlx := r.cfg.DeadLetterExchange
	if err := ch.ExchangeDeclare(dlx, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare dead-letter exchange %q (durable fanout): %w", dlx, err)
	}
	if _, err := ch.QueueDeclare(dlx, true, false, false, false, queueArgs(r.cfg.DeadLetterQueueType)); err != nil {
		return r.deadLetterQueueError(err)
	}
	if err := ch.QueueBind(dlx, "", dlx, false, nil); err != nil {
		return fmt.Errorf("bind dead-letter queue %q: %w", dlx, err)
	}
	if err := ch.Confirm(false); err != nil {
		return fmt.Errorf("enable publisher confirms: %w", err)
	}
	ch.NotifyReturn(r.returns)
	r.conn.NotifyClose(forward(r.closed))
	ch.NotifyClose(forward(r.closed))
	blocked := r.conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	if r.cfg.OnConnection != nil {
		r.cfg.OnConnection(r.node, true)
	}
	go func() {
		// amqp091 closes blocked when the connection shuts down.
		if r.cfg.OnConnection != nil {
			defer r.cfg.OnConnection(r.node, false)
		}
		for b := range blocked {
			r.blocked.Store(b.Active)
			if r.cfg.OnBlocked != nil {
				r.cfg.OnBlocked(b.Active, b.Reason)
			}
		}
		// A closed connection blocks nothing; the next one is told
		// afresh if the alarm is still on.
		if r.blocked.Load() && r.cfg.OnBlocked != nil {
			r.cfg.OnBlocked(false, "connection closed")
		}
	}()
	return nil
}

// forward returns a notify channel whose first close error reaches dst
// without ever blocking amqp091's shutdown.
func forward(dst chan *amqp.Error) chan *amqp.Error {
	src := make(chan *amqp.Error, 1)
	go func() {
		if e, ok := <-src; ok {
			select {
			case dst <- e:
			default:
			}
		} else {
			select {
			case dst <- nil:
			default:
			}
		}
	}()
	return src
}

// ErrClosed reports a connection or channel that went away.
var ErrClosed = errors.New("RabbitMQ connection or channel closed")

func (r *RabbitMQ) closedErr() error {
	select {
	case e := <-r.closed:
		// Put it back so every later caller sees it too.
		select {
		case r.closed <- e:
		default:
		}
		if e != nil {
			return fmt.Errorf("%w: %w", ErrClosed, e)
		}
	default:
	}
	return ErrClosed
}

// Reject implements Publisher: it refuses every message that the client
// library or the broker would refuse, since such a publish does not come
// back as a nack but ends the connection (amqp091 fails to encode a
// shortstr over 255 bytes and shuts the connection down; RabbitMQ closes a
// connection whose content header exceeds frame_max). The relay sends these
// to the dead-letter exchange instead.
func (r *RabbitMQ) Reject(m *Message) string {
	if r.cfg.CloudEvents && m.Type == "" {
		return ceEmptyType
	}
	for _, f := range []struct{ name, v string }{
		{"routing key", m.Key}, {"event_type (the type property)", m.Type}, {"id (the message_id property)", m.ID},
	} {
		if len(f.v) > maxShortString {
			return fmt.Sprintf("%s is %d bytes; AMQP allows at most %d", f.name, len(f.v), maxShortString)
		}
	}
	if r.cfg.MaxMessageBytes > 0 && len(m.Body) > r.cfg.MaxMessageBytes {
		return fmt.Sprintf("payload is %d bytes; RELAY_MAX_MESSAGE_BYTES is %d", len(m.Body), r.cfg.MaxMessageBytes)
	}
	if size, limit := r.messageHeaderFrameSize(m), r.frameMax(); size > limit {
		what := "aggregate_type, aggregate_id, event_type"
		if len(m.Headers) > 0 {
			what += "; header columns (bytes): " + columnNames(m, func(h decoder.Header) int { return len(h.Value) }, 10)
		}
		if m.Traceparent != "" || m.Tracestate != "" {
			what += "; traceparent, tracestate"
		}
		return fmt.Sprintf("message properties and headers (%s) are %d bytes; "+
			"the connection's frame_max allows %d", what, size, limit)
	}
	return ""
}

// frameMax is the largest frame the connection may send, as negotiated.
func (r *RabbitMQ) frameMax() int {
	if r.conn == nil { // an AMQPModel
		return 131072
	}
	if n := r.conn.Config.FrameSize; n > 0 {
		return n
	}
	return 131072 // RabbitMQ's default
}

// CloudEvents attributes in the AMQP binding (binary content mode): each an
// application property (a header) named with this prefix. The spec allows
// "cloudEvents_" and "cloudEvents:" and prefers "_" (JMS selectors).
const amqpCEPrefix = "cloudEvents_"

// amqpContentType is the content_type property of a message with a
// payload, and CloudEvents' datacontenttype. A tombstone has no payload,
// so it has no content_type (and no datacontenttype).
const amqpContentType = "application/json"

// amqpReserved reports a header name the sink sets itself; a header column
// of that name is not sent (config refuses such columns).
func amqpReserved(name string) bool {
	switch name {
	case "aggregate_type", "aggregate_id", "occurred_at", headerTraceparent, headerTracestate, headerTombstone:
		return true
	}
	return strings.HasPrefix(name, amqpCEPrefix) || strings.HasPrefix(name, "x-outbox-")
}

func sameAMQPName(a, b string) bool { return a == b } // AMQP field tables are case-sensitive

// publishing is the message the sink publishes for m: the contract's
// headers, m's header columns under their names, traceparent and
// tracestate when set, tombstone = true for a tombstone, and with
// CloudEvents the cloudEvents_ attributes.
func (r *RabbitMQ) publishing(m *Message) amqp.Publishing {
	h := make(amqp.Table, 3+len(m.Headers)+8)
	eachColumn(m, amqpReserved, sameAMQPName, func(c decoder.Header) { h[c.Name] = c.Value })
	occurred := m.OccurredAt.UTC().Format(time.RFC3339Nano)
	h["aggregate_type"] = m.AggregateType
	h["aggregate_id"] = m.AggregateID
	h["occurred_at"] = occurred
	if m.Traceparent != "" {
		h[headerTraceparent] = m.Traceparent
	}
	if m.Tracestate != "" {
		h[headerTracestate] = m.Tracestate
	}
	contentType := amqpContentType
	if m.Tombstone {
		h[headerTombstone] = true
		contentType = ""
	}
	if r.cfg.CloudEvents {
		h[amqpCEPrefix+"specversion"] = ceSpecVersion
		h[amqpCEPrefix+"id"] = m.ID
		h[amqpCEPrefix+"type"] = m.Type
		h[amqpCEPrefix+"source"] = r.cfg.CloudEventsSource
		if m.AggregateID != "" { // subject, when present, must not be empty
			h[amqpCEPrefix+"subject"] = m.AggregateID
		}
		if !m.OccurredAt.IsZero() {
			// A string: AMQP 0-9-1's timestamp has whole seconds only.
			h[amqpCEPrefix+"time"] = occurred
		}
	}
	return amqp.Publishing{
		Headers:      h,
		ContentType:  contentType,
		DeliveryMode: amqp.Persistent,
		MessageId:    m.ID,
		Timestamp:    m.OccurredAt,
		Type:         m.Type,
		AppId:        "outbox-relay",
		Body:         m.Body,
	}
}

type rabbitPending struct {
	r  *RabbitMQ
	dc *amqp.DeferredConfirmation
	id string
}

// Publish implements Publisher.
func (r *RabbitMQ) Publish(ctx context.Context, m *Message) (Pending, error) {
	defer r.interrupt.during(ctx)()
	dc, err := r.ch.PublishWithDeferredConfirmWithContext(ctx, r.cfg.Exchange, m.Key, true, false, r.publishing(m))
	if err != nil {
		if r.ch.IsClosed() || r.conn.IsClosed() {
			return nil, fmt.Errorf("publish %s: %w", m.ID, r.closedErr())
		}
		return nil, fmt.Errorf("publish %s: %w", m.ID, err)
	}
	return &rabbitPending{r: r, dc: dc, id: m.ID}, nil
}

// Wait implements Pending. Waits must come in publish order from one
// goroutine at a time.
func (p *rabbitPending) Wait(ctx context.Context) (Result, error) {
	r := p.r
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		select {
		case ret, ok := <-r.returns:
			r.record(ret, ok)
		case <-p.dc.Done():
			// A return precedes its ack on the wire and amqp091 hands it to
			// the buffered returns channel before it processes the ack, so
			// it is in the buffer now if it exists.
			r.drainReturns()
			if reason, ok := r.returned[p.id]; ok {
				delete(r.returned, p.id)
				return Result{Outcome: Returned, Reason: reason}, nil
			}
			if p.dc.Acked() {
				return Result{Outcome: Acked}, nil
			}
			if r.ch.IsClosed() || r.conn.IsClosed() {
				return Result{}, fmt.Errorf("confirm of %s: %w", p.id, r.closedErr())
			}
			return Result{Outcome: Nacked, Reason: "basic.nack from broker"}, nil
		case <-ctx.Done():
			return Result{}, ctx.Err()
		}
	}
}

func (r *RabbitMQ) drainReturns() {
	for r.returns != nil {
		select {
		case ret, ok := <-r.returns:
			r.record(ret, ok)
		default:
			return
		}
	}
}

// record remembers a returned message until its confirmation is waited for.
func (r *RabbitMQ) record(ret amqp.Return, ok bool) {
	if !ok {
		// amqp091 closes notify channels on shutdown; a nil channel keeps
		// the selects from spinning on it.
		r.returns = nil
		return
	}
	r.returned[ret.MessageId] = fmt.Sprintf("%d %s", ret.ReplyCode, ret.ReplyText)
}

// DeadLetter implements Publisher. Call it only from the goroutine that calls
// Wait, between Waits.
//
// The copy can never be refused for anything in the message (invariant 8):
// see deadLetterPublishing.
func (r *RabbitMQ) DeadLetter(ctx context.Context, m *Message, reason string) error {
	pub := r.deadLetterPublishing(m, reason)
	end := r.interrupt.during(ctx)
	dc, err := r.ch.PublishWithDeferredConfirmWithContext(ctx, r.cfg.DeadLetterExchange, "", true, false, pub)
	end()
	if err != nil {
		if r.ch.IsClosed() || r.conn.IsClosed() {
			return fmt.Errorf("dead-letter %s: %w", m.ID, r.closedErr())
		}
		return fmt.Errorf("dead-letter %s: %w", m.ID, err)
	}
	res, err := (&rabbitPending{r: r, dc: dc, id: pub.MessageId}).Wait(ctx)
	if err != nil {
		return fmt.Errorf("dead-letter %s: %w", m.ID, err)
	}
	if res.Outcome != Acked {
		return fmt.Errorf("dead-letter %s to %q: %s (%s)", m.ID, r.cfg.DeadLetterExchange, res.Outcome, res.Reason)
	}
	return nil
}

// Headers of a dead-lettered message besides the contract's.
const (
	amqpHeaderReason     = "x-outbox-reason"
	amqpHeaderExchange   = "x-outbox-exchange"
	amqpHeaderRoutingKey = "x-outbox-routing-key"
	amqpHeaderOmitted    = "x-outbox-payload-omitted"
	// amqpHeaderMoved lists the properties (type, message_id) too long for
	// a shortstr: each is left empty and its value is in x-outbox-<name>.
	amqpHeaderMoved = "x-outbox-moved"
	// amqpHeaderCut lists the headers whose values were cut so that the
	// content header fits in one frame.
	amqpHeaderCut = "x-outbox-cut"
	// amqpHeaderDropped lists the trace headers and header columns left
	// out because even cut they do not fit in one frame (very many header
	// columns, or a small frame_max): then all of them are left out, and
	// the list itself may be cut.
	amqpHeaderDropped = "x-outbox-dropped"
)

// deadLetterPublishing is the dead-letter copy of m: properties too long
// for a shortstr move into headers (longstr), header values (header columns
// included) are cut until the content header fits frame_max, and a body
// over RELAY_MAX_MESSAGE_BYTES is left out; when the headers do not fit
// even cut, the header columns and trace headers are left out. Headers say
// which of these happened.
func (r *RabbitMQ) deadLetterPublishing(m *Message, reason string) amqp.Publishing {
	pub := r.publishing(m)
	pub.Headers[amqpHeaderReason] = reason
	pub.Headers[amqpHeaderExchange] = r.cfg.Exchange
	pub.Headers[amqpHeaderRoutingKey] = m.Key
	var moved []string
	for _, p := range []struct {
		name string
		v    *string
	}{{"type", &pub.Type}, {"message_id", &pub.MessageId}} {
		if len(*p.v) > maxShortString {
			pub.Headers["x-outbox-"+p.name] = *p.v
			*p.v = ""
			moved = append(moved, p.name)
		}
	}
	if len(moved) > 0 {
		pub.Headers[amqpHeaderMoved] = strings.Join(moved, ",")
	}
	if r.cfg.MaxMessageBytes > 0 && len(pub.Body) > r.cfg.MaxMessageBytes {
		// The broker would refuse the body too: dead-letter the facts only.
		pub.Body = nil
		pub.Headers[amqpHeaderOmitted] = true
	}
	whole := maps.Clone(pub.Headers)
	if r.fit(&pub) {
		return pub
	}
	// Too many headers to fit even cut, or too many cut to list: leave out
	// the header columns and the trace headers, and cut the rest.
	pub.Headers = whole
	var dropped []string
	drop := func(k string) {
		if _, ok := whole[k]; ok {
			delete(whole, k)
			dropped = append(dropped, k)
		}
	}
	drop(headerTraceparent)
	drop(headerTracestate)
	eachColumn(m, amqpReserved, sameAMQPName, func(c decoder.Header) { drop(c.Name) })
	whole[amqpHeaderDropped] = strings.Join(dropped, ",")
	r.fit(&pub)
	return pub
}

// fit cuts the header values of pub until its content header fits
// frame_max with room for the x-outbox-cut header, which it sets; it
// reports whether the result fits.
func (r *RabbitMQ) fit(pub *amqp.Publishing) bool {
	if cut := fitHeaders(pub, r.frameMax()-512); len(cut) > 0 {
		pub.Headers[amqpHeaderCut] = strings.Join(cut, ",")
	}
	return headerFrameSize(pub) <= r.frameMax()
}

// fitHeaders cuts the longest string header values (at a UTF-8 boundary)
// until the content header frame of pub is at most limit bytes, and returns
// the names of the headers it cut, sorted.
func fitHeaders(pub *amqp.Publishing, limit int) []string {
	cut := map[string]bool{}
	for size := headerFrameSize(pub); size > limit; size = headerFrameSize(pub) {
		longest, n := "", -1
		for k, v := range pub.Headers {
			if s, ok := v.(string); ok && (len(s) > n || len(s) == n && k < longest) {
				longest, n = k, len(s)
			}
		}
		if n <= 0 {
			break // nothing left to cut; cannot happen with the relay's headers
		}
		keep := max(0, n-(size-limit))
		pub.Headers[longest] = cutUTF8(pub.Headers[longest].(string), keep)
		cut[longest] = true
	}
	names := make([]string, 0, len(cut))
	for k := range cut {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// headerFrameSize is the size of the content header frame amqp091 writes
// for pub: frame header and end, class, weight, body size, property flags
// and the properties.
func headerFrameSize(pub *amqp.Publishing) int {
	n := 7 + 2 + 2 + 8 + 2 + 1
	for _, s := range []string{pub.ContentType, pub.ContentEncoding, pub.CorrelationId, pub.ReplyTo,
		pub.Expiration, pub.MessageId, pub.Type, pub.UserId, pub.AppId} {
		if s != "" {
			n += 1 + len(s)
		}
	}
	if pub.DeliveryMode > 0 {
		n++
	}
	if pub.Priority > 0 {
		n++
	}
	if !pub.Timestamp.IsZero() {
		n += 8
	}
	if len(pub.Headers) > 0 {
		n += 4
		for k, v := range pub.Headers {
			n += 1 + len(k) + 1
			switch v := v.(type) {
			case string:
				n += 4 + len(v)
			case bool:
				n++
			default:
				n += 64 // the relay sets only strings and booleans
			}
		}
	}
	return n
}

// messageHeaderFrameSize is headerFrameSize(r.publishing(m)) without
// building the publishing, which Reject would otherwise do for every event.
func (r *RabbitMQ) messageHeaderFrameSize(m *Message) int {
	var buf [64]byte
	occurred := len(m.OccurredAt.UTC().AppendFormat(buf[:0], time.RFC3339Nano))
	n := 7 + 2 + 2 + 8 + 2 + 1       // frame header and end, class, weight, body size, flags
	n += 1 + 1 + len("outbox-relay") // delivery mode, app id
	if !m.Tombstone {
		n += 1 + len(amqpContentType)
	}
	if m.ID != "" {
		n += 1 + len(m.ID)
	}
	if m.Type != "" {
		n += 1 + len(m.Type)
	}
	if !m.OccurredAt.IsZero() {
		n += 8
	}
	n += 4 // the headers table's length
	for _, kv := range [...]struct{ k, v int }{
		{len("aggregate_type"), len(m.AggregateType)}, {len("aggregate_id"), len(m.AggregateID)}, {len("occurred_at"), occurred},
	} {
		n += 1 + kv.k + 1 + 4 + kv.v
	}
	str := func(k string, v int) { n += 1 + len(k) + 1 + 4 + v } // a longstr entry
	eachColumn(m, amqpReserved, sameAMQPName, func(c decoder.Header) { str(c.Name, len(c.Value)) })
	if m.Traceparent != "" {
		str(headerTraceparent, len(m.Traceparent))
	}
	if m.Tracestate != "" {
		str(headerTracestate, len(m.Tracestate))
	}
	if m.Tombstone {
		n += 1 + len(headerTombstone) + 1 + 1 // a boolean entry
	}
	if r.cfg.CloudEvents {
		str(amqpCEPrefix+"specversion", len(ceSpecVersion))
		str(amqpCEPrefix+"id", len(m.ID))
		str(amqpCEPrefix+"type", len(m.Type))
		str(amqpCEPrefix+"source", len(r.cfg.CloudEventsSource))
		if m.AggregateID != "" {
			str(amqpCEPrefix+"subject", len(m.AggregateID))
		}
		if !m.OccurredAt.IsZero() {
			str(amqpCEPrefix+"time", occurred)
		}
	}
	return n
}

// cutUTF8 returns the longest prefix of s of at most n bytes that does not
// split a UTF-8 sequence.
func cutUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Hold implements Batcher: publishes are buffered until Flush.
func (r *RabbitMQ) Hold() { r.wire.Hold() }

// Flush implements Batcher.
func (r *RabbitMQ) Flush(ctx context.Context) error {
	defer r.interrupt.during(ctx)()
	if err := r.wire.Flush(); err != nil {
		if r.ch.IsClosed() || r.conn.IsClosed() {
			return fmt.Errorf("write to RabbitMQ: %w", r.closedErr())
		}
		return fmt.Errorf("write to RabbitMQ: %w", err)
	}
	return nil
}

// closeTimeout bounds Close: the close handshake needs an answer that a
// blocked or silent broker never sends.
const closeTimeout = time.Second

// Close implements Publisher. It returns within about two closeTimeouts,
// whatever the broker does.
func (r *RabbitMQ) Close() error {
	if r.wire.interrupted.Load() || r.blocked.Load() {
		// A write was cut off, so the close handshake cannot be sent; or
		// the broker blocks the connection and does not read it, so it
		// would never answer.
		_ = r.wire.Conn.Close()
	}
	done := make(chan error, 1)
	go func() {
		// Writes fail after the deadline rather than block on a broker
		// that stopped reading.
		_ = r.wire.Conn.SetWriteDeadline(time.Now().Add(closeTimeout))
		// The close handshake must not sit in a held buffer.
		_ = r.wire.Flush()
		if r.ch != nil {
			_ = r.ch.Close()
		}
		done <- r.conn.Close()
	}()
	t := time.NewTimer(closeTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
	}
	// No close-ok: drop the socket, which ends amqp091's reader and every
	// call waiting for an answer.
	_ = r.wire.Conn.Close()
	t.Reset(closeTimeout)
	select {
	case <-done:
		return fmt.Errorf("close RabbitMQ connection: no answer within %s; closed the socket", closeTimeout)
	case <-t.C:
		return fmt.Errorf("close RabbitMQ connection: no answer within %s, and the library did not finish after the socket was closed", closeTimeout)
	}
}
