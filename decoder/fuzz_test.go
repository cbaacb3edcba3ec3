package decoder

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// FuzzDecode feeds arbitrary bytes to Decode two ways: as one message to a
// decoder that already knows the outbox relation and is inside a
// transaction, and as a stream of messages (each prefixed by a 2-byte
// length) to a fresh decoder, so the relation cache and transaction state
// are fuzzed too. Decode must never panic, every error must wrap ErrProtocol
// or ErrSchema, and no result may alias the input.
func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d := newInTx(t)
		checkDecode(t, d, data)

		d = New("public", "outbox_events", nil)
		for rest := data; len(rest) >= 2; {
			n := int(binary.BigEndian.Uint16(rest))
			rest = rest[2:]
			if n > len(rest) {
				n = len(rest)
			}
			checkDecode(t, d, rest[:n])
			rest = rest[n:]
		}
	})
}

func checkDecode(t *testing.T, d *Decoder, data []byte) {
	buf := bytes.Clone(data)
	m, err := d.Decode(buf)
	if err != nil {
		if !errors.Is(err, ErrProtocol) && !errors.Is(err, ErrSchema) {
			t.Fatalf("error wraps neither ErrProtocol nor ErrSchema: %v", err)
		}
		if m.Kind != KindNone {
			t.Fatalf("error with kind %v", m.Kind)
		}
		return
	}
	if m.Kind != KindEvent {
		return
	}
	ev := m.Event
	want := ev
	want.Payload = bytes.Clone(ev.Payload)
	for i := range buf {
		buf[i] ^= 0xFF
	}
	if !reflect.DeepEqual(ev, want) {
		t.Fatalf("event changed when the input was reused")
	}
	if ev.Invalid == "" && (ev.OccurredAt.IsZero() || ev.Payload == nil) {
		t.Fatalf("valid event without occurred_at or payload: %+v", ev)
	}
	if ev.Invalid != "" && !ev.OccurredAt.IsZero() {
		t.Fatalf("invalid event with occurred_at: %+v", ev)
	}
}

// fuzzSeeds are single valid messages and short valid streams.
func fuzzSeeds() [][]byte {
	seeds := validFrames()
	vals := row(`{}`)
	vals[5] = txt("infinity")
	seeds = append(seeds, insertFrame(outboxRel, vals...))
	vals = row(`null`)
	vals[0] = null
	vals[5] = txt("2026-11-27 00:34:49-03:30:15")
	seeds = append(seeds, insertFrame(outboxRel, vals...))

	stream := func(frames ...[]byte) []byte {
		var out []byte
		for _, f := range frames {
			out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
			out = append(out, f...)
		}
		return out
	}
	ct := time.Date(2026, 11, 27, 4, 5, 4, 0, time.UTC)
	seeds = append(seeds,
		stream(
			beginFrame(0x300, ct, 9),
			relationFrame(outboxRel, "public", "outbox_events", "tenant", "payload", "occurred_at",
				"event_type", "aggregate_id", "id", "aggregate_type"),
			insertFrame(outboxRel, txt("acme"), txt(`[1]`), txt(testTS), txt("e"), txt(testAggID), txt(testID), txt("a")),
			commitFrame(0x300, 0x330, ct),
		),
		stream(
			relationFrame(outboxRel, "public", "outbox_events", "id", "payload"),
			beginFrame(0x300, ct, 9),
			insertFrame(outboxRel, txt(testID), txt(`{}`)),
		),
	)
	return seeds
}

// TestWriteFuzzSeeds regenerates the committed seed corpus files:
// DECODER_WRITE_SEEDS=1 go test -run TestWriteFuzzSeeds ./decoder/
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("DECODER_WRITE_SEEDS") == "" {
		t.Skip("set DECODER_WRITE_SEEDS=1 to regenerate testdata/fuzz/FuzzDecode/seed-*")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, s := range fuzzSeeds() {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
		kind := "stream"
		if s[0] >= 'A' && s[0] <= 'Z' {
			kind = string(s[0])
		}
		name := fmt.Sprintf("seed-%02d-%s", i, kind)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
