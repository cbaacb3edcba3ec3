package sink

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

func TestNATSSubjectRules(t *testing.T) {
	for s, ok := range map[string]bool{
		"outbox.order.created": true, "a": true, "outbox.order-v2.created_x": true, "a*b.c>d": true,
		"": false, "outbox..created": false, ".a": false, "a.": false, "outbox.*.created": false,
		"outbox.>": false, "outbox.bad type.created": false, "a\tb": false, "a\nb": false,
		strings.Repeat("a", maxSubjectBytes+1): false,
	} {
		if got := ValidSubject(s) == ""; got != ok {
			t.Errorf("ValidSubject(%.40q) = %q, want valid=%v", s, ValidSubject(s), ok)
		}
	}
	for _, c := range []struct {
		filter, want string
		ok           bool
	}{
		{"outbox.>", "outbox.>", true}, {">", "outbox.>", true}, {"outbox.*.>", "outbox.>", false},
		{"outbox.>", "outbox", false}, {"outbox.*", "outbox.a", true}, {"outbox.*", "outbox.a.b", false},
		{"outbox.a", "outbox.a", true}, {"outbox.a", "outbox.b", false}, {"outbox.*", "outbox.>", false},
		{"*.*", "a.b", true}, {"other.>", "outbox.>", false},
	} {
		if got := covers(c.filter, c.want); got != c.ok {
			t.Errorf("covers(%q, %q) = %v, want %v", c.filter, c.want, got, c.ok)
		}
	}
}

// natsTest is one test's private streams on the shared server.
type natsTest struct {
	cfg    NATSConfig
	prefix string // subjects are prefix.…
	js     jetstream.JetStream
}

func newNATSTest(t *testing.T) *natsTest {
	t.Helper()
	testenv.Integration(t)
	url := testenv.NATS(t)
	prefix := testenv.Name(t, "subj")
	nt := &natsTest{prefix: prefix, cfg: NATSConfig{
		URL:               url,
		Stream:            testenv.Name(t, "events"),
		StreamSubjects:    []string{prefix + ".>"},
		DeadLetterStream:  testenv.Name(t, "dead"),
		DeadLetterSubject: prefix + "_dead_letter.events",
		MaxPending:        256,
		AckTimeout:        10 * time.Second,
	}}
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	if nt.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, s := range []string{nt.cfg.Stream, nt.cfg.DeadLetterStream} {
			if err := nt.js.DeleteStream(ctx, s); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
				t.Errorf("delete stream %s: %v", s, err)
			}
		}
		nc.Close()
	})
	return nt
}

func (nt *natsTest) dial(t *testing.T) *NATS {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	n, err := DialNATS(ctx, nt.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// stored returns the messages of a stream in sequence order.
func (nt *natsTest) stored(t *testing.T, stream string) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx := context.Background()
	s, err := nt.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

func testMessage(id, key, body string) *Message {
	return &Message{ID: id, Key: key, Type: "created", AggregateType: "order",
		AggregateID: "10000000-0000-4000-8000-000000000001",
		OccurredAt:  time.Date(2024, 5, 1, 12, 0, 0, 123456789, time.FixedZone("x", 3600)), Body: []byte(body)}
}

func waitResult(t *testing.T, p Pending) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	res, err := p.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestNATSPublishCreatesStreamAndKeepsFormat: the streams are created with
// the documented settings, messages are acked, stored in publish order with
// the subject, headers and body of the contract.
func TestNATSPublishCreatesStreamAndKeepsFormat(t *testing.T) {
	nt := newNATSTest(t)
	n := nt.dial(t)
	ctx := context.Background()
	var pending []Pending
	var sent []*Message
	for i, body := range []string{`{"a":1}`, `null`, `"✓ naïve"`, `[1, 2]`} {
		m := testMessage("00000000-0000-4000-8000-00000000000"+string(rune('1'+i)), nt.prefix+".order.created", body)
		if r := n.Reject(m); r != "" {
			t.Fatalf("Reject: %s", r)
		}
		p, err := n.Publish(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		pending, sent = append(pending, p), append(sent, m)
	}
	for i, p := range pending {
		if res := waitResult(t, p); res.Outcome != Acked || res.Duplicate {
			t.Fatalf("message %d: %+v, want a fresh ack", i, res)
		}
	}
	got := nt.stored(t, nt.cfg.Stream)
	if len(got) != len(sent) {
		t.Fatalf("stream holds %d messages, want %d", len(got), len(sent))
	}
	for i, m := range got {
		w := sent[i]
		h := m.Header
		if m.Subject != w.Key || string(m.Data) != string(w.Body) || h.Get(jetstream.MsgIDHeader) != w.ID ||
			h.Get("type") != "created" || h.Get("Content-Type") != "application/json" ||
			h.Get("aggregate_type") != "order" || h.Get("aggregate_id") != w.AggregateID ||
			h.Get("occurred_at") != "2024-05-01T11:00:00.123456789Z" {
			t.Fatalf("message %d: subject %q body %q headers %v", i, m.Subject, m.Data, h)
		}
	}
	s, err := nt.js.Stream(ctx, nt.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	c := s.CachedInfo().Config
	if c.Storage != jetstream.FileStorage || c.Duplicates != 2*time.Minute || c.Retention != jetstream.LimitsPolicy ||
		len(c.Subjects) != 1 || c.Subjects[0] != nt.prefix+".>" {
		t.Fatalf("stream config %+v", c)
	}
	// A second relay finds the streams and uses them as they are.
	nt.dial(t)
}

// TestNATSDuplicateIsAckedNotStored: the same message id published twice
// is stored once; the second ack says Duplicate. This is what makes a
// relay's replay after a crash invisible to NATS consumers.
func TestNATSDuplicateIsAckedNotStored(t *testing.T) {
	nt := newNATSTest(t)
	n := nt.dial(t)
	ctx := context.Background()
	m := testMessage("00000000-0000-4000-8000-000000000042", nt.prefix+".order.created", `{"v":1}`)
	p1, err := n.Publish(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	if res := waitResult(t, p1); res.Outcome != Acked || res.Duplicate {
		t.Fatalf("first publish: %+v", res)
	}
	// A new connection, as after a relay restart.
	n2 := nt.dial(t)
	p2, err := n2.Publish(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	if res := waitResult(t, p2); res.Outcome != Acked || !res.Duplicate {
		t.Fatalf("second publish: %+v, want Acked and Duplicate", res)
	}
	if got := nt.stored(t, nt.cfg.Stream); len(got) != 1 {
		t.Fatalf("stream holds %d messages, want 1", len(got))
	}
}

// TestNATSUnroutableIsReturned: a subject no stream captures is the
// analogue of an unroutable message: Returned, not an error.
func TestNATSUnroutableIsReturned(t *testing.T) {
	nt := newNATSTest(t)
	n := nt.dial(t)
	m := testMessage("00000000-0000-4000-8000-000000000007", nt.prefix+"_nowhere.order.created", `{}`)
	p, err := n.Publish(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	res := waitResult(t, p)
	if res.Outcome != Returned || !strings.Contains(res.Reason, "no JetStream stream captures") {
		t.Fatalf("%+v, want Returned", res)
	}
	// The connection is still usable.
	ok := testMessage("00000000-0000-4000-8000-000000000008", nt.prefix+".order.created", `{}`)
	p, err = n.Publish(context.Background(), ok)
	if err != nil {
		t.Fatal(err)
	}
	if res := waitResult(t, p); res.Outcome != Acked {
		t.Fatalf("%+v after a returned message", res)
	}
}

// TestNATSRejectAndDeadLetter: messages NATS can never take are rejected
// with the reason; DeadLetter stores them in the dead-letter stream with
// the reason header (the payload omitted when it is too big).
func TestNATSRejectAndDeadLetter(t *testing.T) {
	nt := newNATSTest(t)
	nt.cfg.MaxMessageBytes = 4096
	n := nt.dial(t)
	cases := map[string]*Message{
		"white space": testMessage("00000000-0000-4000-8000-000000000011", nt.prefix+".bad type.created", `{}`),
		"empty token": testMessage("00000000-0000-4000-8000-000000000012", nt.prefix+"..created", `{}`),
		"wildcard":    testMessage("00000000-0000-4000-8000-000000000013", nt.prefix+".*.created", `{}`),
		"4096":        testMessage("00000000-0000-4000-8000-000000000014", nt.prefix+".order.created", `"`+strings.Repeat("x", 5000)+`"`),
	}
	ctx := context.Background()
	for want, m := range cases {
		reason := n.Reject(m)
		if !strings.Contains(reason, want) {
			t.Fatalf("Reject(%q) = %q, want it to mention %q", m.Key, reason, want)
		}
		if err := n.DeadLetter(ctx, m, "rejected: "+reason); err != nil {
			t.Fatal(err)
		}
	}
	// A repeated dead-letter (a replay) is deduplicated too.
	if err := n.DeadLetter(ctx, cases["wildcard"], "again"); err != nil {
		t.Fatal(err)
	}
	dead := nt.stored(t, nt.cfg.DeadLetterStream)
	if len(dead) != len(cases) {
		t.Fatalf("dead-letter stream holds %d messages, want %d", len(dead), len(cases))
	}
	for _, d := range dead {
		h := d.Header
		if d.Subject != nt.cfg.DeadLetterSubject || !strings.HasPrefix(h.Get("Outbox-Reason"), "rejected: ") ||
			h.Get("Outbox-Subject") == "" || h.Get(jetstream.MsgIDHeader) == "" {
			t.Fatalf("dead letter %q headers %v", d.Subject, h)
		}
		big := h.Get(jetstream.MsgIDHeader) == cases["4096"].ID
		if big != (h.Get("Outbox-Payload-Omitted") == "true") || big != (len(d.Data) == 0) {
			t.Fatalf("dead letter %s: payload %d bytes, headers %v", h.Get(jetstream.MsgIDHeader), len(d.Data), h)
		}
	}
}

// TestNATSExistingStreamMustCaptureSubjects: a stream of that name that does
// not capture the relay's subjects is a configuration error at dial, not a
// stream of returned messages.
func TestNATSExistingStreamMustCaptureSubjects(t *testing.T) {
	nt := newNATSTest(t)
	_, err := nt.js.CreateStream(context.Background(), jetstream.StreamConfig{
		Name: nt.cfg.Stream, Subjects: []string{nt.prefix + ".other.*"}, Storage: jetstream.MemoryStorage})
	if err != nil {
		t.Fatal(err)
	}
	_, err = DialNATS(context.Background(), nt.cfg)
	if err == nil || !strings.Contains(err.Error(), "does not capture") {
		t.Fatalf("DialNATS = %v, want a does-not-capture error", err)
	}
}

// TestNATSClosedConnectionIsAnError: after the connection is gone, Publish
// and Wait return errors (the relay reconnects), never a verdict or a hang.
func TestNATSClosedConnectionIsAnError(t *testing.T) {
	nt := newNATSTest(t)
	n := nt.dial(t)
	ctx := context.Background()
	m := testMessage("00000000-0000-4000-8000-000000000021", nt.prefix+".order.created", `{}`)
	n.nc.Close()
	if _, err := n.Publish(ctx, m); !errors.Is(err, ErrNATSClosed) {
		t.Fatalf("Publish after close: %v, want ErrNATSClosed", err)
	}

	n = nt.dial(t)
	// Close before the ack is read: Wait returns the ack if it beat the
	// close, else an error; it never hangs.
	p, err := n.Publish(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	n.nc.Close()
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := p.Wait(wctx)
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatal("Wait hung after the connection closed")
	}
	if err == nil && res.Outcome != Acked {
		t.Fatalf("Wait = %+v, want an error or the ack that beat the close", res)
	}
}

// TestNATSRejectAndDeadLetterEveryField (invariant 8): for every text field
// that reaches a NATS subject or header, at 0, 1, 255, 256 and 10,000 bytes
// and over max_payload, in ASCII and multibyte UTF-8, with the characters a
// header cannot carry, and in combination: a message Reject accepts is
// stored with every header exactly as sent, and the dead-letter copy of
// every message, accepted or not, is stored, with its reason and the
// values it could not carry as they are listed as quoted or cut.
func TestNATSRejectAndDeadLetterEveryField(t *testing.T) {
	nt := newNATSTest(t)
	n := nt.dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	events, err := nt.js.Stream(ctx, nt.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := nt.js.Stream(ctx, nt.cfg.DeadLetterStream)
	if err != nil {
		t.Fatal(err)
	}
	big := n.maxPayload + 1
	text := func(size int, multibyte bool) string {
		if !multibyte {
			return strings.Repeat("a", size)
		}
		return strings.Repeat("日", size/3) + strings.Repeat("b", size%3)
	}
	var values []string
	for _, size := range []int{0, 1, 255, 256, 10000, big} {
		values = append(values, text(size, false), text(size, true))
	}
	values = append(values, "a\nb", "a\r\nNats-Msg-Id: forged", " lead", "trail ", "tab\tinside", "nul\x00", "del\x7f", "é")
	fields := map[string]func(m *Message, v string){
		"event_type":     func(m *Message, v string) { m.Type = v },
		"aggregate_type": func(m *Message, v string) { m.AggregateType = v },
		"aggregate_id":   func(m *Message, v string) { m.AggregateID = v },
		"id":             func(m *Message, v string) { m.ID = v },
		"subject":        func(m *Message, v string) { m.Key = nt.prefix + "." + v },
	}
	seq := 0
	check := func(desc string, m *Message) {
		t.Helper()
		if reason := n.Reject(m); reason == "" {
			p, err := n.Publish(ctx, m)
			if err != nil {
				t.Fatalf("%s: Reject accepted it but Publish failed: %v", desc, err)
			}
			if res := waitResult(t, p); res.Outcome != Acked {
				t.Fatalf("%s: Reject accepted it but the stream did not ack it: %v", desc, res)
			}
			got, err := events.GetLastMsgForSubject(ctx, m.Key)
			if err != nil {
				t.Fatalf("%s: %v", desc, err)
			}
			h := got.Header
			if h.Get(jetstream.MsgIDHeader) != m.ID || h.Get("type") != m.Type ||
				h.Get("aggregate_type") != m.AggregateType || h.Get("aggregate_id") != m.AggregateID {
				t.Fatalf("%s: Reject accepted it but the stored headers differ from the message", desc)
			}
		}
		const reason = "test:\npoison"
		if err := n.DeadLetter(ctx, m, reason); err != nil {
			t.Fatalf("%s: dead-letter copy refused: %v", desc, err)
		}
		d, err := dead.GetLastMsgForSubject(ctx, nt.cfg.DeadLetterSubject)
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		h := d.Header
		quoted, cut := listed(h.Get(natsHeaderQuoted)), listed(h.Get(natsHeaderCut))
		for k, want := range map[string]string{
			jetstream.MsgIDHeader: m.ID, "type": m.Type, "aggregate_type": m.AggregateType,
			"aggregate_id": m.AggregateID, natsHeaderSubject: m.Key, natsHeaderReason: reason,
		} {
			got := h.Get(k)
			if cut[k] {
				continue
			}
			if quoted[k] {
				if got, err = strconv.Unquote(got); err != nil {
					t.Fatalf("%s: header %s listed as quoted: %v", desc, k, err)
				}
			}
			if got != want {
				t.Fatalf("%s: dead-letter header %s differs from the message without saying so", desc, k)
			}
		}
		seq++
	}
	for name, set := range fields {
		for i, v := range values {
			m := testMessage(fmt.Sprintf("00000000-0000-4000-8000-%012d", seq), nt.prefix+".order.created", `{"n":1}`)
			set(m, v)
			check(fmt.Sprintf("%s value %d (%d bytes)", name, i, len(v)), m)
		}
	}
	for i, v := range values {
		// A new id: the stream deduplicates the ids used above.
		m := testMessage(fmt.Sprintf("%s-%d", v, i), nt.prefix+"."+v, strings.Repeat("x", big))
		m.Type, m.AggregateType, m.AggregateID = v, v, v
		check(fmt.Sprintf("every field value %d (%d bytes)", i, len(v)), m)
	}
}

// listed is the set of names in a comma-separated header value.
func listed(v string) map[string]bool {
	set := map[string]bool{}
	for _, k := range strings.Split(v, ",") {
		set[k] = true
	}
	return set
}

// TestNATSReturnsWhileTheServerStopsReading (invariant 11): when the
// server stops reading, nats.go blocks in the socket write with its lock
// held; a publish whose context is cancelled must return, and so must
// Close, which flushes.
func TestNATSReturnsWhileTheServerStopsReading(t *testing.T) {
	nt := newNATSTest(t)
	u, err := url.Parse(nt.cfg.URL)
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"Publish", "DeadLetter"} {
		t.Run(op, func(t *testing.T) {
			px := newStallingProxy(t, u.Host)
			cfg := nt.cfg
			pu := *u
			pu.Host = px.ln.Addr().String()
			cfg.URL = pu.String()
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			n, err := DialNATS(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			px.stall()
			// Far more than the socket buffers hold, so the write blocks.
			m := testMessage("00000000-0000-4000-8000-000000000001", nt.prefix+".order.created", strings.Repeat("x", 500<<10))
			pctx, pcancel := context.WithCancel(context.Background())
			returned := make(chan error, 1)
			go func() {
				var err error
				for err == nil {
					if op == "Publish" {
						_, err = n.Publish(pctx, m)
					} else {
						err = n.DeadLetter(pctx, m, "test")
					}
				}
				returned <- err
			}()
			select {
			case err := <-returned:
				t.Fatalf("%s returned before the cancel, with %v: the server was not blocking it", op, err)
			case <-time.After(500 * time.Millisecond):
			}
			pcancel()
			select {
			case err := <-returned:
				t.Logf("%s after the cancel: %v", op, err)
			case <-time.After(10 * time.Second):
				t.Fatalf("%s still blocked 10s after its context was cancelled", op)
			}
			within(t, 10*time.Second, "Close", func() { _ = n.Close() })
		})
	}
}

// TestNATSHeaderColumnsRejectAndDeadLetter (invariant 8): header columns
// and trace headers that NATS cannot carry as they are (a line break,
// which nats.go would turn into a space, other control characters, white
// space at the ends) are rejected with a reason naming the column; headers
// just under, at and over JetStream's 64 KiB are published or rejected;
// and the dead-letter copy of every one is stored, the offending value
// quoted and the long ones cut. With thousands of header columns the copy
// leaves them out and lists them in Outbox-Dropped. The connection stays up
// throughout.
func TestNATSHeaderColumnsRejectAndDeadLetter(t *testing.T) {
	nt := newNATSTest(t)
	nt.cfg.CloudEvents, nt.cfg.CloudEventsSource = true, "outbox-relay:test/public.outbox"
	n := nt.dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dead, err := nt.js.Stream(ctx, nt.cfg.DeadLetterStream)
	if err != nil {
		t.Fatal(err)
	}
	events, err := nt.js.Stream(ctx, nt.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	seq := 0
	base := func() *Message {
		seq++
		m := testMessage(fmt.Sprintf("00000000-0000-4000-8000-%012d", seq), nt.prefix+".order.created", `{"n":1}`)
		m.Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
		m.Headers = []decoder.Header{{Name: "tenant", Value: "acme"}, {Name: "note", Value: "ok"}}
		return m
	}
	check := func(desc string, m *Message, wantReason string) {
		t.Helper()
		rej := n.Reject(m)
		if wantReason == "" && rej != "" || wantReason != "" && !strings.Contains(rej, wantReason) {
			t.Fatalf("%s: Reject = %q, want %q", desc, rej, wantReason)
		}
		if rej == "" {
			p, err := n.Publish(ctx, m)
			if err != nil {
				t.Fatalf("%s: %v", desc, err)
			}
			if res := waitResult(t, p); res.Outcome != Acked {
				t.Fatalf("%s: accepted but not acked: %+v", desc, res)
			}
			got, err := events.GetLastMsgForSubject(ctx, m.Key)
			if err != nil {
				t.Fatalf("%s: %v", desc, err)
			}
			for _, h := range m.Headers {
				if got.Header.Get(h.Name) != h.Value {
					t.Fatalf("%s: header column %s stored as %.40q", desc, h.Name, got.Header.Get(h.Name))
				}
			}
		}
		if err := n.DeadLetter(ctx, m, "rejected["+rej+"]"); err != nil {
			t.Fatalf("%s: dead-letter copy refused: %v", desc, err)
		}
		d, err := dead.GetLastMsgForSubject(ctx, nt.cfg.DeadLetterSubject)
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		h := d.Header
		if h.Get(jetstream.MsgIDHeader) != m.ID || !strings.HasPrefix(h.Get(natsHeaderReason), "rejected[") {
			t.Fatalf("%s: dead letter of another message, or without its reason: %v", desc, h.Get(natsHeaderReason))
		}
		quoted, cut := listed(h.Get(natsHeaderQuoted)), listed(h.Get(natsHeaderCut))
		dropped := h.Get(natsHeaderDropped) != "" // then every column and trace header is left out
		for _, c := range append(m.Headers, decoder.Header{Name: "traceparent", Value: m.Traceparent}) {
			got, present := h.Get(c.Name), len(h.Values(c.Name)) > 0
			switch {
			case dropped:
				if present {
					t.Fatalf("%s: column %s present although the copy says it dropped them", desc, c.Name)
				}
				continue
			case cut[c.Name]:
				continue
			case quoted[c.Name]:
				if got, err = strconv.Unquote(got); err != nil {
					t.Fatalf("%s: column %s listed as quoted: %v", desc, c.Name, err)
				}
			}
			if got != c.Value {
				t.Fatalf("%s: dead-letter column %s differs without saying so", desc, c.Name)
			}
		}
		if n.nc.IsClosed() {
			t.Fatalf("%s: the connection closed", desc)
		}
	}
	for _, v := range []string{"a\nb", "a\r\nNats-Msg-Id: forged", "line\r", "nul\x00", "bell\x07", " lead", "trail\t"} {
		m := base()
		m.Headers[1].Value = v
		check(fmt.Sprintf("note %q", v), m, "header column note")
	}
	m := base()
	m.Tracestate = "congo=t61rcWkgMzE "
	check("tracestate with trailing space", m, "header tracestate")
	m = base()
	m.Headers[1].Value = "tab\tinside, é, \"quotes\""
	check("note with a tab inside", m, "")

	// Headers just under, at and over JetStream's limit.
	room := maxHeaderBytes - headerSize(n.natsMessage(nt.prefix+".x", base()).Header) + len("ok")
	for _, delta := range []int{-2, -1, 0, 1, 2, 100000} {
		m := base()
		m.Headers[1].Value = strings.Repeat("n", room+delta)
		want := ""
		if delta > 0 {
			want = "note"
		}
		check(fmt.Sprintf("headers at the limit%+d", delta), m, want)
	}
	// More columns than fit even empty: the copy drops them.
	m = base()
	for i := 0; len(m.Headers) < 2000; i++ {
		m.Headers = append(m.Headers, decoder.Header{Name: fmt.Sprintf("c%061d", i), Value: "v"})
	}
	check("2000 header columns", m, "2000 columns")
	d, err := dead.GetLastMsgForSubject(ctx, nt.cfg.DeadLetterSubject)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Header.Get(natsHeaderDropped); !strings.HasPrefix(got, "traceparent,tenant,note,c000") {
		t.Fatalf("2000 header columns: Outbox-Dropped %.100q", got)
	}
}
