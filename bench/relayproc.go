package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat;
// it is 100 on every Linux architecture Go supports.
const clockTicks = 100

// buildRelay compiles ./cmd/outbox-relay from the working tree once, so the
// relay runs as its own process and its CPU and RSS are its alone.
func buildRelay(ctx context.Context, root, dir string) (string, error) {
	bin := filepath.Join(dir, "outbox-relay")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/outbox-relay")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build ./cmd/outbox-relay: %w\n%s", err, out)
	}
	return bin, nil
}

// relayProc is one running outbox-relay process.
type relayProc struct {
	cmd     *exec.Cmd
	logPath string
	log     *os.File
	done    chan struct{}
	err     error // exit status, valid after done is closed
	started time.Time
}

func startRelay(bin string, env []string, logPath string) (*relayProc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run")
	cmd.Env = env
	cmd.Stdout = f
	cmd.Stderr = f
	// Its own process group, so a Ctrl-C in the terminal reaches only the
	// bench, which then stops the relay in order; and SIGTERM if the bench
	// dies without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start relay: %w", err)
	}
	p := &relayProc{cmd: cmd, logPath: logPath, log: f, done: make(chan struct{}), started: time.Now()}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *relayProc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended, and how.
func (p *relayProc) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// cpu is the process's user+system CPU time so far (all threads).
func (p *relayProc) cpu() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid()))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc/pid/stat format")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, errors.New("short /proc/pid/stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("unexpected /proc/pid/stat utime/stime")
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// peakRSS is VmHWM: the process's peak resident set since it started.
func (p *relayProc) peakRSS() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(v)
			if len(f) >= 1 {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb * 1024, err
			}
		}
	}
	return 0, errors.New("no VmHWM in /proc/pid/status")
}

// stop sends SIGTERM (drain, final acknowledgement, exit 0) and waits; after
// timeout it kills the process.
func (p *relayProc) stop(timeout time.Duration) error {
	if done, err := p.exited(); done {
		return fmt.Errorf("relay had already exited: %v", err)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("relay exited with %v after SIGTERM", p.err)
		}
		return nil
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("relay did not stop within %s of SIGTERM; killed", timeout)
	}
}

// tail returns the last lines of the relay's log, for error reports.
func (p *relayProc) tail(lines int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
