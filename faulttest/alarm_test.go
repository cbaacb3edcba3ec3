//go:build faults

package faulttest

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rabbitmqctl runs rabbitmqctl and returns its trimmed output.
func rabbitmqctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmqctl %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// memoryAlarm raises RabbitMQ's memory alarm (a high watermark of 0), which
// blocks every publishing connection on the shared broker, other tests'
// too: keep it on for seconds only. The returned restore sets the
// watermark read before, exactly; it also runs at cleanup, on failure too.
func memoryAlarm(t *testing.T) (restore func()) {
	t.Helper()
	was := rabbitmqctl(t, "eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
	if _, err := strconv.ParseFloat(was, 64); err != nil {
		// {absolute, N} or a newer form: restoring it is not written yet.
		t.Fatalf("vm_memory_high_watermark is %q, not a fraction this test can restore", was)
	}
	restored := false
	restore = func() {
		if restored {
			return
		}
		restored = true
		out, err := exec.Command("rabbitmqctl", "set_vm_memory_high_watermark", was).CombinedOutput()
		if err != nil {
			t.Errorf("RESTORE FAILED: rabbitmqctl set_vm_memory_high_watermark %s: %v\n%s", was, err, out)
		}
	}
	t.Cleanup(restore)
	rabbitmqctl(t, "set_vm_memory_high_watermark", "0")
	return restore
}

func get(addr, path string) (int, string) {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric returns the value of an unlabelled series from /metrics, or -1.
func metric(addr, name string) float64 {
	_, body := get(addr, "/metrics")
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// TestStopWhileRabbitMQBlocksPublishers (invariant 11): during a resource
// alarm RabbitMQ stops reading from the relay's connection, so publishes
// block in the socket write. /readyz says blocked and why, the blocked
// time is counted, the log says so once, and SIGTERM still ends the
// process within RELAY_SHUTDOWN_TIMEOUT plus a moment. After the alarm,
// a new relay delivers every committed row.
func TestStopWhileRabbitMQBlocksPublishers(t *testing.T) {
	w := newWorld(t)
	addr := freeAddr(t)
	const shutdownTimeout = 3 * time.Second
	p := w.startRelay("RELAY_METRICS_ADDR="+addr, "RELAY_SHUTDOWN_TIMEOUT="+shutdownTimeout.String())
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(30*time.Second, "events to flow", func() bool { return w.received() > 50 })

	restore := memoryAlarm(t)
	w.waitFor(20*time.Second, "/readyz to say blocked", func() bool {
		code, body := get(addr, "/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "blocked by RabbitMQ: ")
	})
	_, body := get(addr, "/readyz")
	t.Logf("/readyz while blocked: %q", strings.TrimSpace(body))
	w.waitFor(10*time.Second, "blocked seconds to count", func() bool {
		return metric(addr, "outbox_relay_broker_blocked_seconds_total") > 0
	})
	if g := metric(addr, "outbox_relay_broker_blocked"); g != 1 {
		t.Fatalf("outbox_relay_broker_blocked = %v while blocked", g)
	}
	// Rows committed now wait behind the alarm.
	w.waitFor(10*time.Second, "rows behind the alarm", func() bool {
		var n int
		err := w.pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_events WHERE published_at IS NULL`).Scan(&n)
		return err == nil && n > 20
	})
	prod.halt()
	if n := strings.Count(p.out.String(), "RabbitMQ blocks publishing"); n != 1 {
		t.Fatalf("the log says %d times that RabbitMQ blocks publishing, want once per episode", n)
	}

	start := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	var took time.Duration
	select {
	case <-p.exited:
		took = time.Since(start)
	case <-time.After(shutdownTimeout + 2*time.Second):
		restore()
		t.Fatalf("relay still running %s after SIGTERM with RELAY_SHUTDOWN_TIMEOUT=%s while RabbitMQ blocked it",
			time.Since(start).Round(time.Millisecond), shutdownTimeout)
	}
	restore()
	t.Logf("SIGTERM while blocked: exited %d after %s", p.cmd.ProcessState.ExitCode(), took.Round(time.Millisecond))
	for _, line := range strings.Split(p.out.String(), "\n") {
		if strings.Contains(line, "stop") || strings.Contains(line, "drain") || strings.Contains(line, "block") {
			t.Log(line)
		}
	}

	w.startRelay()
	events, lost, dups := w.verify(90 * time.Second)
	t.Logf("after the alarm: %d events, %d lost, %d duplicated", events, lost, dups)
}
