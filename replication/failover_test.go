package replication

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// fakeWire is a server of a given version that records the commands it is
// sent. CREATE_REPLICATION_SLOT answers with a slot; the failover SELECT
// with slotFailover ("t", "f", or "" for no such slot); a command with a
// prefix in fail gets that error.
type fakeWire struct {
	version      string
	slotFailover string
	fail         map[string]error
	sent         []string
}

func (f *fakeWire) ParameterStatus(key string) string {
	if key == "server_version" {
		return f.version
	}
	return ""
}

func (f *fakeWire) Run(_ context.Context, sql string) ([]*pgconn.Result, error) {
	f.sent = append(f.sent, sql)
	for prefix, err := range f.fail {
		if strings.HasPrefix(sql, prefix) {
			return nil, err
		}
	}
	switch {
	case strings.HasPrefix(sql, "CREATE_REPLICATION_SLOT "):
		return []*pgconn.Result{{Rows: [][][]byte{{[]byte("s"), []byte("0/16B3748"), []byte("00000003-00000002-1"), []byte("pgoutput")}}}}, nil
	case strings.HasPrefix(sql, "SELECT failover "):
		if f.slotFailover == "" {
			return []*pgconn.Result{{}}, nil
		}
		return []*pgconn.Result{{Rows: [][][]byte{{[]byte(f.slotFailover)}}}}, nil
	}
	return []*pgconn.Result{{}}, nil
}

// Today's command, as pglogrepl.CreateReplicationSlot sends it: the relay
// must send exactly this before 17 or without RELAY_FAILOVER_SLOT.
const legacyCreate = "CREATE_REPLICATION_SLOT outbox_relay  LOGICAL pgoutput EXPORT_SNAPSHOT"

// The PostgreSQL 17 command (protocol.sgml, CREATE_REPLICATION_SLOT's
// option list, FAILOVER since 17).
const failoverCreate = `CREATE_REPLICATION_SLOT "outbox_relay" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)`

var versions = map[int]string{
	15: "15.20 (Debian 15.20-0+deb12u1)",
	16: "16.4",
	17: "17.2",
	18: "18.0",
}

func TestCreateSlotCommandByVersion(t *testing.T) {
	for major, version := range versions {
		for _, want := range []bool{false, true} {
			f := &fakeWire{version: version}
			c := &Conn{w: f}
			WithFailoverSlot(want)(c)
			slot, err := c.CreateSlot(t.Context(), "outbox_relay")
			if err != nil {
				t.Fatalf("%d, failover %v: %v", major, want, err)
			}
			expect := legacyCreate
			if want && major >= 17 {
				expect = failoverCreate
			}
			if !slices.Equal(f.sent, []string{expect}) {
				t.Errorf("server %d, RELAY_FAILOVER_SLOT=%v sent %q, want exactly %q", major, want, f.sent, expect)
			}
			if slot.ConsistentPoint.String() != "0/16B3748" || slot.Snapshot != "00000003-00000002-1" {
				t.Errorf("server %d: slot %+v, want consistent point 0/16B3748 and snapshot 00000003-00000002-1", major, slot)
			}
		}
	}
}

func TestEnsureFailoverByVersion(t *testing.T) {
	const (
		check = "SELECT failover FROM pg_catalog.pg_replication_slots WHERE slot_name = 'outbox_relay'"
		alter = `ALTER_REPLICATION_SLOT "outbox_relay" ( FAILOVER true )`
	)
	for _, tc := range []struct {
		major        int
		want         bool
		slotFailover string
		sent         []string
	}{
		{15, true, "f", nil}, // before 17: not even asked
		{16, true, "f", nil},
		{17, false, "f", nil}, // not wanted
		{18, false, "f", nil},
		{17, true, "f", []string{check, alter}},
		{18, true, "f", []string{check, alter}},
		{17, true, "t", []string{check}}, // already a failover slot
		{18, true, "t", []string{check}},
		{17, true, "", []string{check}}, // no such slot: START_REPLICATION says so
	} {
		f := &fakeWire{version: versions[tc.major], slotFailover: tc.slotFailover}
		c := &Conn{w: f}
		WithFailoverSlot(tc.want)(c)
		if err := c.ensureFailover(t.Context(), "outbox_relay"); err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		if !slices.Equal(f.sent, tc.sent) {
			t.Errorf("server %d, RELAY_FAILOVER_SLOT=%v, slot failover %q: sent %q, want %q",
				tc.major, tc.want, tc.slotFailover, f.sent, tc.sent)
		}
	}
}

// A slot this connection created with FAILOVER is not checked again.
func TestEnsureFailoverAfterCreateSendsNothing(t *testing.T) {
	f := &fakeWire{version: versions[17], slotFailover: "f"}
	c := &Conn{w: f}
	WithFailoverSlot(true)(c)
	if _, err := c.CreateSlot(t.Context(), "outbox_relay"); err != nil {
		t.Fatal(err)
	}
	if err := c.ensureFailover(t.Context(), "outbox_relay"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(f.sent, []string{failoverCreate}) {
		t.Errorf("sent %q, want only %q", f.sent, failoverCreate)
	}
}

// Start makes an existing slot a failover slot before it streams, and a
// failed ALTER_REPLICATION_SLOT is its error (it never reaches
// START_REPLICATION, which this fake cannot serve).
func TestStartAltersBeforeStreaming(t *testing.T) {
	refused := errors.New("refused")
	f := &fakeWire{version: versions[17], slotFailover: "f", fail: map[string]error{"ALTER_REPLICATION_SLOT ": refused}}
	c := &Conn{w: f}
	WithFailoverSlot(true)(c)
	err := c.Start(t.Context(), "outbox_relay", "outbox_relay_pub", 0)
	if !errors.Is(err, refused) || !strings.Contains(err.Error(), "RELAY_FAILOVER_SLOT") {
		t.Fatalf("Start = %v, want the ALTER's error, naming RELAY_FAILOVER_SLOT", err)
	}
	if len(f.sent) != 2 || !strings.HasPrefix(f.sent[1], "ALTER_REPLICATION_SLOT ") {
		t.Errorf("sent %q, want the check then the ALTER", f.sent)
	}
}

func TestFailoverCommandsQuoteTheName(t *testing.T) {
	// RELAY_SLOT allows a leading digit; unquoted, the replication scanner
	// reads "1a" as a number and a name.
	if got, want := createSlotSQL("1a", true), `CREATE_REPLICATION_SLOT "1a" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)`; got != want {
		t.Errorf("createSlotSQL = %s, want %s", got, want)
	}
	if got, want := alterFailoverSQL("1a"), `ALTER_REPLICATION_SLOT "1a" ( FAILOVER true )`; got != want {
		t.Errorf("alterFailoverSQL = %s, want %s", got, want)
	}
	if got, want := slotFailoverSQL("o'x"), `SELECT failover FROM pg_catalog.pg_replication_slots WHERE slot_name = 'o''x'`; got != want {
		t.Errorf("slotFailoverSQL = %s, want %s", got, want)
	}
}
