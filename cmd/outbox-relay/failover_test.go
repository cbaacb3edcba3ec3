package main

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// freeAddr returns a local address nothing listens on just now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestFailoverSlotOn15 runs the relay with RELAY_FAILOVER_SLOT=true on the
// real server, PostgreSQL 15: it warns once, naming the version, streams
// from an ordinary slot, /readyz stays 200 and shows the row, and `status`
// shows it too. Without the option both say off.
func TestFailoverSlotOn15(t *testing.T) {
	testenv.Integration(t)
	e := newRelayEnv(t)
	e.migrate(t)
	newConsumer(t, e.amqpURL, e.exchange)
	db := e.conn(t)
	var version string
	if err := db.QueryRow(t.Context(), `SELECT split_part(current_setting('server_version'), ' ', 1)`).Scan(&version); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(version, "15.") {
		t.Fatalf("server is PostgreSQL %s: this test knows what 15 shows", version)
	}
	row := "not supported on server version " + version + " (failover slots need PostgreSQL 17)"

	addr := freeAddr(t)
	// A short poll interval: several reads, still one warning.
	vars := with(e.vars(), "RELAY_FAILOVER_SLOT", "true", "RELAY_METRICS_ADDR", addr, "RELAY_STATUS_POLL_INTERVAL", "100ms")
	p := start(t, vars, "run")
	if !p.waitOutput(`"message":"streaming"`, 30*time.Second) {
		t.Fatalf("the relay did not start streaming within 30s")
	}
	var code int
	var body string
	if !eventually(10*time.Second, func() bool {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		code, body = resp.StatusCode, string(b)
		return strings.Contains(body, "failover slot: not supported")
	}) {
		t.Fatalf("/readyz = %d %q, want the failover slot's row", code, body)
	}
	if code != http.StatusOK || !strings.HasPrefix(body, "streaming\n") || !strings.Contains(body, "failover slot: "+row) {
		t.Errorf("/readyz = %d %q, want 200, streaming, and failover slot: %s", code, body, row)
	}
	time.Sleep(time.Second) // about ten more reads
	warning := "RELAY_FAILOVER_SLOT=true, but the server is PostgreSQL " + version + " and failover slots need 17: using an ordinary slot"
	if n := strings.Count(p.all.String(), warning); n != 1 {
		t.Errorf("the warning %q was logged %d times, want once", warning, n)
	}
	var temporary bool
	if err := db.QueryRow(t.Context(), `SELECT temporary FROM pg_replication_slots WHERE slot_name = $1`, e.slot).Scan(&temporary); err != nil || temporary {
		t.Errorf("slot %s: temporary=%v err=%v, want an ordinary permanent slot", e.slot, temporary, err)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}

	text, all, code := runBin(t, vars, 30*time.Second, "status")
	if code != 0 || !regexp.MustCompile(`(?m)^failover slot +`+regexp.QuoteMeta(row)).MatchString(text) {
		t.Errorf("status exited %d, want 0 with the row failover slot %s:\n%s", code, row, all)
	}
	stdout, all, code := runBin(t, vars, 30*time.Second, "status", "--json")
	var st struct {
		Failover *struct {
			Wanted, Supported bool
			ServerVersion     string `json:"server_version"`
		} `json:"failover_slot"`
	}
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || code != 0 {
		t.Fatalf("status --json exited %d: %v\n%s", code, err, all)
	}
	if st.Failover == nil || !st.Failover.Wanted || st.Failover.Supported || st.Failover.ServerVersion != version {
		t.Errorf("status --json failover_slot = %+v, want wanted, unsupported, version %s", st.Failover, version)
	}

	text, all, code = runBin(t, e.vars(), 30*time.Second, "status")
	if code != 0 || !regexp.MustCompile(`(?m)^failover slot +off$`).MatchString(text) {
		t.Errorf("status without RELAY_FAILOVER_SLOT exited %d, want 0 with the row failover slot off:\n%s", code, all)
	}
}
