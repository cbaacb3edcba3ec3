package sink

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// rabbitTest is one test's private exchanges and queues on the shared broker.
type rabbitTest struct {
	cfg   RabbitMQConfig
	conn  *amqp.Connection
	queue string // bound to everything the exchange routes
}

func newRabbitTest(t *testing.T) *rabbitTest {
	t.Helper()
	testenv.Integration(t)
	rt := &rabbitTest{cfg: RabbitMQConfig{
		URL:                testenv.AMQP(t),
		Exchange:           testenv.Name(t, "ex"),
		DeadLetterExchange: testenv.Name(t, "dlx"),
		MaxMessageBytes:    1 << 20,
	}, queue: testenv.Name(t, "q")}
	var err error
	if rt.conn, err = amqp.Dial(rt.cfg.URL); err != nil {
		t.Fatal(err)
	}
	ch, err := rt.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(rt.cfg.Exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(rt.queue, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(rt.queue, "#", rt.cfg.Exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if ch, err := rt.conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(rt.queue, false, false, false)
			_, _ = ch.QueueDelete(rt.cfg.DeadLetterExchange, false, false, false)
			_ = ch.ExchangeDelete(rt.cfg.Exchange, false, false)
			_ = ch.ExchangeDelete(rt.cfg.DeadLetterExchange, false, false)
		}
		rt.conn.Close()
	})
	return rt
}

func (rt *rabbitTest) dial(t *testing.T) *RabbitMQ {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	r, err := DialRabbitMQ(ctx, rt.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// get takes the next message from queue.
func (rt *rabbitTest) get(t *testing.T, queue string) (amqp.Delivery, bool) {
	t.Helper()
	ch, err := rt.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	d, ok, err := ch.Get(queue, true)
	if err != nil {
		t.Fatal(err)
	}
	return d, ok
}

// TestAMQPShortstrOver255EndsTheConnection records what amqp091 does with a
// type property over 255 bytes, which is why Reject must catch it: the
// publish fails on the client and the library shuts the connection down.
// No nack, no return: without Reject, every retry would end the session.
func TestAMQPShortstrOver255EndsTheConnection(t *testing.T) {
	rt := newRabbitTest(t)
	r := rt.dial(t)
	m := testMessage("00000000-0000-4000-8000-000000000001", "order.created", `{}`)
	m.Type = strings.Repeat("t", 256)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	p, err := r.Publish(ctx, m)
	if err == nil {
		_, err = p.Wait(ctx)
	}
	if err == nil {
		t.Fatal("a 256-byte type property was published; Reject need not refuse it")
	}
	t.Logf("publish: %v", err)
	deadline := time.Now().Add(10 * time.Second)
	for !r.conn.IsClosed() {
		if time.Now().After(deadline) {
			t.Fatal("the connection stayed open after the failed publish")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRabbitMQRejectAndDeadLetterEveryField (invariant 8): for every text
// field that reaches a size-limited part of an AMQP message, at 0, 1, 255,
// 256 and 10,000 bytes, in ASCII and multibyte UTF-8, and in combination:
// a message Reject accepts is published and acked on a connection that
// stays open, and the dead-letter copy of every message, accepted or not, is
// acked, with its reason and the values the properties could not carry.
func TestRabbitMQRejectAndDeadLetterEveryField(t *testing.T) {
	rt := newRabbitTest(t)
	r := rt.dial(t)
	sizes := []int{0, 1, 255, 256, 10000, 200000}
	text := func(n int, multibyte bool) string {
		if !multibyte {
			return strings.Repeat("a", n)
		}
		// 3-byte runes, then ASCII to reach exactly n bytes.
		return strings.Repeat("日", n/3) + strings.Repeat("b", n%3)
	}
	type field struct {
		name string
		set  func(m *Message, v string)
	}
	fields := []field{
		{"event_type", func(m *Message, v string) { m.Type = v }},
		{"aggregate_type", func(m *Message, v string) { m.AggregateType = v }},
		{"aggregate_id", func(m *Message, v string) { m.AggregateID = v }},
		{"id", func(m *Message, v string) { m.ID = v }},
		{"routing key", func(m *Message, v string) { m.Key = v }},
	}
	seq := 0
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	check := func(desc string, m *Message) {
		t.Helper()
		seq++
		if reason := r.Reject(m); reason == "" {
			p, err := r.Publish(ctx, m)
			if err != nil {
				t.Fatalf("%s: Reject accepted it but Publish failed: %v", desc, err)
			}
			res, err := p.Wait(ctx)
			if err != nil || res.Outcome != Acked {
				t.Fatalf("%s: Reject accepted it but the broker did not ack it: %v %v", desc, res, err)
			}
			d, ok := rt.get(t, rt.queue)
			if !ok || d.Type != m.Type || d.MessageId != m.ID || d.Headers["aggregate_type"] != m.AggregateType {
				t.Fatalf("%s: published message not as sent (found %v)", desc, ok)
			}
		}
		const reason = "test: poison"
		if err := r.DeadLetter(ctx, m, reason); err != nil {
			t.Fatalf("%s: dead-letter copy refused: %v", desc, err)
		}
		d, ok := rt.get(t, rt.cfg.DeadLetterExchange)
		if !ok {
			t.Fatalf("%s: dead-letter queue empty", desc)
		}
		if d.Headers["x-outbox-reason"] != reason {
			t.Fatalf("%s: reason header %q", desc, d.Headers["x-outbox-reason"])
		}
		cut, _ := d.Headers["x-outbox-cut"].(string)
		moved, _ := d.Headers["x-outbox-moved"].(string)
		id := d.MessageId
		if strings.Contains(moved, "message_id") {
			id, _ = d.Headers["x-outbox-message_id"].(string)
		}
		typ := d.Type
		if strings.Contains(moved, "type") {
			typ, _ = d.Headers["x-outbox-type"].(string)
		}
		if cut == "" && (id != m.ID || typ != m.Type || d.Headers["aggregate_type"] != m.AggregateType ||
			d.Headers["x-outbox-routing-key"] != m.Key || d.Headers["aggregate_id"] != m.AggregateID) {
			t.Fatalf("%s: dead-letter copy lost a value without saying so (moved %q)", desc, moved)
		}
		if len(m.Type) > maxShortString && !strings.Contains(moved, "type") ||
			len(m.ID) > maxShortString && !strings.Contains(moved, "message_id") {
			t.Fatalf("%s: long property not moved (moved %q)", desc, moved)
		}
		for _, k := range strings.Split(cut, ",") {
			if v, ok := d.Headers[k].(string); ok && !strings.HasPrefix(original(m, k, reason), v) {
				t.Fatalf("%s: header %s was not cut at a prefix", desc, k)
			}
		}
		if r.conn.IsClosed() {
			t.Fatalf("%s: the connection closed", desc)
		}
	}
	for _, f := range fields {
		for _, n := range sizes {
			for _, mb := range []bool{false, true} {
				m := testMessage("00000000-0000-4000-8000-000000000001", "order.created", `{"n":1}`)
				f.set(m, text(n, mb))
				check(fmt.Sprintf("%s of %d bytes (multibyte %v)", f.name, n, mb), m)
			}
		}
	}
	// Combinations: everything long at once, with the payload over the limit.
	for _, n := range sizes {
		m := testMessage(text(n, true), text(n, false), strings.Repeat("x", rt.cfg.MaxMessageBytes+1))
		m.Type, m.AggregateType, m.AggregateID = text(n, false), text(n, true), text(n, true)
		check(fmt.Sprintf("every field at %d bytes", n), m)
	}
}

// original is the value of m that the dead-letter header k carries.
func original(m *Message, k, reason string) string {
	return map[string]string{
		"aggregate_type": m.AggregateType, "aggregate_id": m.AggregateID, "x-outbox-routing-key": m.Key,
		"x-outbox-type": m.Type, "x-outbox-message_id": m.ID, "x-outbox-reason": reason,
	}[k]
}

// stallingProxy forwards TCP connections to upstream; after stall it stops
// reading from the client, as RabbitMQ does with a publishing connection
// during a resource alarm, while still forwarding what the broker sends.
type stallingProxy struct {
	ln      net.Listener
	stalled chan struct{}
	once    sync.Once
}

func newStallingProxy(t *testing.T, upstream string) *stallingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallingProxy{ln: ln, stalled: make(chan struct{})}
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, u)
			mu.Unlock()
			go func() { _, _ = io.Copy(c, u) }()
			go func() {
				buf := make([]byte, 4096)
				for {
					select {
					case <-p.stalled:
						return // leaves c unread, open
					default:
					}
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := u.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return p
}

func (p *stallingProxy) stall() { p.once.Do(func() { close(p.stalled) }) }

// within fails the test if f does not return within d; a hang is the
// failure this guards against, so d is generous.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %s", what, d)
	}
}

// TestRabbitMQReturnsWhileTheBrokerStopsReading (invariant 11): when the
// broker stops reading (a resource alarm), a publish blocks in the socket
// write; cancelling its context must end it, and Close must return
// although the broker never answers the close handshake. The same for
// Flush of held writes and DeadLetter.
func TestRabbitMQReturnsWhileTheBrokerStopsReading(t *testing.T) {
	rt := newRabbitTest(t)
	u, err := url.Parse(rt.cfg.URL)
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"Publish", "Held", "DeadLetter"} {
		t.Run(op, func(t *testing.T) {
			px := newStallingProxy(t, u.Host)
			cfg := rt.cfg
			pu := *u
			pu.Host = px.ln.Addr().String()
			cfg.URL = pu.String()
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			r, err := DialRabbitMQ(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			px.stall()
			// Far more than the socket buffers hold, so the write blocks.
			m := testMessage("00000000-0000-4000-8000-000000000001", "order.created", strings.Repeat("x", 900<<10))
			pctx, pcancel := context.WithCancel(context.Background())
			returned := make(chan error, 1)
			go func() {
				var err error
				switch op {
				case "Publish":
					for err == nil {
						_, err = r.Publish(pctx, m)
					}
				case "Held": // writes held for a Flush: blocked in Publish once the buffer fills, or in Flush
					r.Hold()
					for i := 0; i < 64 && err == nil; i++ {
						_, err = r.Publish(pctx, m)
					}
					if err == nil {
						err = r.Flush(pctx)
					}
				case "DeadLetter":
					for err == nil {
						err = r.DeadLetter(pctx, m, "test")
					}
				}
				returned <- err
			}()
			select {
			case err := <-returned:
				t.Fatalf("%s returned before the cancel, with %v: the broker was not blocking it", op, err)
			case <-time.After(500 * time.Millisecond):
			}
			pcancel()
			select {
			case err := <-returned:
				t.Logf("%s after the cancel: %v", op, err)
			case <-time.After(10 * time.Second):
				t.Fatalf("%s still blocked 10s after its context was cancelled", op)
			}
			within(t, 10*time.Second, "Close", func() { _ = r.Close() })
		})
	}
}

// TestRabbitMQFrameMaxBoundary: headerFrameSize is exact, not a guess: a
// message whose content header is exactly frame_max is accepted by Reject
// and acked by the broker, one byte more is rejected. An estimate too low
// would let the broker close the connection; one too high would reject
// good events. (RabbitMQ itself allows 8 bytes more, its FRAME_SIZE_FUDGE:
// by trial, a frame of frame_max+8 bytes by this count was acked and one of
// frame_max+9 closed the connection, so the count is exact.)
func TestRabbitMQFrameMaxBoundary(t *testing.T) {
	rt := newRabbitTest(t)
	r := rt.dial(t)
	limit := r.frameMax()
	for _, extra := range []int{0, 1} {
		m := testMessage("00000000-0000-4000-8000-000000000001", "order.created", `{}`)
		m.AggregateType = ""
		pub := r.publishing(m)
		m.AggregateType = strings.Repeat("a", limit-headerFrameSize(&pub)+extra)
		reason := r.Reject(m)
		if extra == 1 {
			if !strings.Contains(reason, "frame_max") {
				t.Fatalf("one byte over frame_max: Reject = %q", reason)
			}
			continue
		}
		if reason != "" {
			t.Fatalf("exactly frame_max (%d): Reject = %q", limit, reason)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		p, err := r.Publish(ctx, m)
		if err == nil {
			var res Result
			if res, err = p.Wait(ctx); err == nil && res.Outcome != Acked {
				t.Fatalf("exactly frame_max: %v", res)
			}
		}
		cancel()
		if err != nil {
			t.Fatalf("a content header of exactly frame_max (%d bytes) failed: %v", limit, err)
		}
	}
}

// TestMessageHeaderFrameSizeMatchesThePublishing: Reject's shortcut counts
// what publishing builds, for any lengths and timestamps, header columns
// (a reserved or repeated name is not sent, so not counted), trace headers,
// tombstones, with CloudEvents on and off.
func TestMessageHeaderFrameSizeMatchesThePublishing(t *testing.T) {
	withAll := testMessage("00000000-0000-4000-8000-000000000001", "order.created", `{}`)
	withAll.Headers = []decoder.Header{{Name: "tenant", Value: "acme"}, {Name: "note", Value: "a\nb 日本"},
		{Name: "empty", Value: ""}, {Name: "tenant", Value: "again"}, {Name: "tombstone", Value: "reserved"},
		{Name: "cloudEvents_id", Value: "reserved"}, {Name: "big", Value: strings.Repeat("x", 70000)}}
	withAll.Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	withAll.Tracestate = "congo=t61rcWkgMzE"
	tomb := testMessage("00000000-0000-4000-8000-000000000002", "order.deleted", "")
	tomb.Tombstone, tomb.Body = true, nil
	tomb.AggregateID = ""
	for _, ce := range []bool{false, true} {
		r := &RabbitMQ{cfg: RabbitMQConfig{CloudEvents: ce, CloudEventsSource: "outbox-relay:db/public.outbox"}}
		for _, m := range []*Message{
			{},
			testMessage("00000000-0000-4000-8000-000000000001", "order.created", `{}`),
			{ID: "x", Type: strings.Repeat("t", 300), AggregateType: "日本", AggregateID: "",
				OccurredAt: time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)},
			{Type: "a", OccurredAt: time.Date(1, 1, 1, 0, 0, 0, 1, time.FixedZone("y", -7200))},
			withAll, tomb,
			{Tracestate: "a=b", Headers: []decoder.Header{{Name: "only", Value: "v"}}},
		} {
			pub := r.publishing(m)
			if got, want := r.messageHeaderFrameSize(m), headerFrameSize(&pub); got != want {
				t.Errorf("CloudEvents %v, %.200v: messageHeaderFrameSize = %d, headerFrameSize(publishing) = %d", ce, m, got, want)
			}
		}
	}
}

// TestRabbitMQHeaderColumnsAtTheFrameMaxBoundary (invariant 8) at every
// length around the limit: a header column whose value brings the content
// header to just under, exactly at and just over frame_max, and far over
// it, with the trace headers and CloudEvents on, in ASCII and multibyte
// UTF-8. Each event is either published (acked, with every header as sent)
// or rejected with a reason naming the header column, and then
// dead-lettered; the dead-letter copy of every one is acked, with the cut
// columns listed, and the connection stays up throughout. With thousands of
// header columns, which do not fit even cut, the copy leaves them out and
// lists them in x-outbox-dropped.
func TestRabbitMQHeaderColumnsAtTheFrameMaxBoundary(t *testing.T) {
	rt := newRabbitTest(t)
	rt.cfg.CloudEvents, rt.cfg.CloudEventsSource = true, "outbox-relay:test/public.outbox"
	r := rt.dial(t)
	limit := r.frameMax()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	base := func(i int) *Message {
		m := testMessage(fmt.Sprintf("00000000-0000-4000-8000-%012d", i), "order.created", `{"n":1}`)
		m.Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
		m.Tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
		m.Headers = []decoder.Header{{Name: "tenant", Value: "acme"}, {Name: "note", Value: ""}}
		return m
	}
	room := limit - r.messageHeaderFrameSize(base(0)) // bytes the note column may take
	const reason = "test: poison"
	seq := 0
	check := func(desc string, m *Message, wantAccepted bool) {
		t.Helper()
		seq++
		rej := r.Reject(m)
		if wantAccepted != (rej == "") {
			t.Fatalf("%s: content header %d bytes, frame_max %d: Reject = %q", desc, r.messageHeaderFrameSize(m), limit, rej)
		}
		if rej == "" {
			p, err := r.Publish(ctx, m)
			if err != nil {
				t.Fatalf("%s: %v", desc, err)
			}
			if res, err := p.Wait(ctx); err != nil || res.Outcome != Acked {
				t.Fatalf("%s: accepted but not acked: %v %v", desc, res, err)
			}
			d, ok := rt.get(t, rt.queue)
			if !ok {
				t.Fatalf("%s: published message not in the queue", desc)
			}
			for _, h := range m.Headers {
				if d.Headers[h.Name] != h.Value {
					t.Fatalf("%s: header column %s arrived as %.40q", desc, h.Name, d.Headers[h.Name])
				}
			}
			if d.Headers["traceparent"] != m.Traceparent || d.Headers["tracestate"] != m.Tracestate ||
				d.Headers["cloudEvents_id"] != m.ID {
				t.Fatalf("%s: trace or CloudEvents headers not as sent: %v", desc, d.Headers)
			}
		} else if !strings.Contains(rej, "frame_max") || !strings.Contains(rej, "header columns") ||
			len(m.Headers) < 10 && !strings.Contains(rej, "note") {
			t.Fatalf("%s: reason %q does not name frame_max and the note column", desc, rej)
		}
		if err := r.DeadLetter(ctx, m, "rejected: "+rej); err != nil {
			t.Fatalf("%s: dead-letter copy refused: %v", desc, err)
		}
		d, ok := rt.get(t, rt.cfg.DeadLetterExchange)
		if !ok {
			t.Fatalf("%s: dead-letter queue empty", desc)
		}
		if got, _ := d.Headers["x-outbox-reason"].(string); !strings.HasPrefix(got, "rejected: ") {
			t.Fatalf("%s: reason header %q", desc, got)
		}
		cut := listed(fmt.Sprint(d.Headers["x-outbox-cut"]))
		_, dropped := d.Headers["x-outbox-dropped"] // then every column and trace header is left out
		for _, h := range append(m.Headers, decoder.Header{Name: "traceparent", Value: m.Traceparent},
			decoder.Header{Name: "tracestate", Value: m.Tracestate}) {
			got, present := d.Headers[h.Name].(string)
			switch {
			case dropped:
				if present {
					t.Fatalf("%s: column %s present although the copy says it dropped them", desc, h.Name)
				}
			case cut[h.Name]:
				if !strings.HasPrefix(h.Value, got) || !utf8.ValidString(got) {
					t.Fatalf("%s: column %s listed as cut is not a prefix at a UTF-8 boundary", desc, h.Name)
				}
			case got != h.Value:
				t.Fatalf("%s: dead-letter column %s (%d bytes) differs without saying so", desc, h.Name, len(h.Value))
			}
		}
		if r.conn.IsClosed() || r.ch.IsClosed() {
			t.Fatalf("%s: the connection closed", desc)
		}
	}
	text := func(n int, multibyte bool) string {
		if !multibyte {
			return strings.Repeat("n", n)
		}
		return strings.Repeat("é", n/2) + strings.Repeat("b", n%2)
	}
	for _, delta := range []int{-3, -2, -1, 0, 1, 2, 3, 1000, 4 * limit} {
		for _, mb := range []bool{false, true} {
			m := base(seq)
			m.Headers[1].Value = text(room+delta, mb)
			check(fmt.Sprintf("note column at frame_max%+d (multibyte %v)", delta, mb), m, delta <= 0)
		}
	}
	// Two columns sharing the room, one byte apart at the boundary.
	for _, delta := range []int{0, 1} {
		m := base(seq)
		m.Headers = append(m.Headers, decoder.Header{Name: "other", Value: ""})
		room2 := limit - r.messageHeaderFrameSize(m)
		m.Headers[1].Value, m.Headers[2].Value = text(room2/2, false), text(room2-room2/2+delta, true)
		check(fmt.Sprintf("two columns at frame_max%+d", delta), m, delta == 0)
	}
	// More columns than fit even empty: the copy drops them.
	m := base(seq)
	for i := 0; len(m.Headers) < 3000; i++ {
		m.Headers = append(m.Headers, decoder.Header{Name: fmt.Sprintf("c%061d", i), Value: "v"})
	}
	m.Headers = append(m.Headers, decoder.Header{Name: "note", Value: "x"}) // a repeated name is not sent
	check("3000 header columns", m, false)
	if err := r.DeadLetter(ctx, m, "again"); err != nil {
		t.Fatal(err)
	}
	d, _ := rt.get(t, rt.cfg.DeadLetterExchange)
	if dropped, _ := d.Headers["x-outbox-dropped"].(string); !strings.HasPrefix(dropped, "traceparent,tracestate,tenant,note,c000") {
		t.Fatalf("3000 header columns: x-outbox-dropped %.100q", dropped)
	}
	if d.Headers["aggregate_id"] != m.AggregateID || d.Headers["x-outbox-reason"] != "again" {
		t.Fatalf("3000 header columns: the contract's headers did not survive: %v", d.Headers["aggregate_id"])
	}
}

// TestRabbitMQNodesRotate: with a list of nodes where only one answers, a
// dial reaches it whichever node the list starts at, says which node it
// is on, and the next dial starts after that node. With none answering
// the error names each node and never a password.
func TestRabbitMQNodesRotate(t *testing.T) {
	rt := newRabbitTest(t)
	dead := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close() // refused from now on
		return addr
	}
	d1, d2 := dead(), dead()
	live := rt.cfg.URL
	u, err := url.Parse(live)
	if err != nil {
		t.Fatal(err)
	}
	deadURL := func(addr string) string {
		v := *u
		v.Host = addr
		v.User = url.UserPassword("guest", "s3cret")
		return v.String()
	}
	nodes := &Nodes{urls: []string{deadURL(d1), live, deadURL(d2)}}
	cfg := rt.cfg
	cfg.Nodes = nodes
	for start := range 3 {
		nodes.next.Store(int64(start))
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		r, err := DialRabbitMQ(ctx, cfg)
		cancel()
		if err != nil {
			t.Fatalf("start %d: %v", start, err)
		}
		if r.Node() != NodeAddr(live) {
			t.Errorf("start %d: on node %s, want %s", start, r.Node(), NodeAddr(live))
		}
		if got := nodes.next.Load(); got != 2 {
			t.Errorf("start %d: the next dial starts at node %d, want 2 (after the live one)", start, got)
		}
		r.Close()
	}
	cfg.Nodes = &Nodes{urls: []string{deadURL(d1), deadURL(d2)}}
	_, err = DialRabbitMQ(context.Background(), cfg)
	if err == nil {
		t.Fatal("dialled with no node answering")
	}
	for _, want := range []string{"no RabbitMQ node of 2 answered", d1, d2} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error shows the password: %s", err)
	}
	if NodeAddr("amqps://u:p@h") != "h:5671" || NodeAddr("amqp://h") != "h:5672" {
		t.Errorf("NodeAddr defaults: %s %s", NodeAddr("amqps://u:p@h"), NodeAddr("amqp://h"))
	}
	// A fresh list of several starts somewhere in it.
	seen := map[int64]bool{}
	for range 200 {
		seen[NewNodes([]string{"a", "b", "c"}).next.Load()] = true
	}
	if len(seen) != 3 {
		t.Errorf("NewNodes started at %d of 3 nodes in 200 tries", len(seen))
	}
}

// TestRabbitMQDialLeavesTheTLSConfigAlone: amqp091 fills an empty
// ServerName with the URL's host. Were the relay's one TLS config handed
// to it, every node after the first would be checked against the first
// node's name.
func TestRabbitMQDialLeavesTheTLSConfigAlone(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close() // no TLS handshake: the dial fails
		}
	}()
	shared := &tls.Config{}
	cfg := RabbitMQConfig{Exchange: "x", DeadLetterExchange: "y", TLS: shared,
		Nodes: &Nodes{urls: []string{"amqps://" + l.Addr().String() + "/", "amqps://localhost:1/"}}}
	if _, err := DialRabbitMQ(context.Background(), cfg); err == nil {
		t.Fatal("dialled a listener that speaks no TLS")
	}
	if shared.ServerName != "" {
		t.Fatalf("the dial set the shared TLS config's ServerName to %q", shared.ServerName)
	}
}
