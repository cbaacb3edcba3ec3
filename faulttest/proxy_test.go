//go:build faults

package faulttest

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// proxy forwards TCP connections to upstream and can cut them or silence
// them (a peer that stops answering without closing).
type proxy struct {
	ln       net.Listener
	upstream string
	silent   atomic.Bool
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	closed   atomic.Bool
}

func newProxy(t *testing.T, upstream string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, upstream: upstream, conns: map[net.Conn]struct{}{}}
	go p.accept()
	t.Cleanup(func() {
		p.closed.Store(true)
		ln.Close()
		p.Cut()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) port() string {
	_, port, _ := net.SplitHostPort(p.addr())
	return port
}

func (p *proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[u] = struct{}{}, struct{}{}
		p.mu.Unlock()
		go p.pipe(c, u)
		go p.pipe(u, c)
	}
}

func (p *proxy) pipe(src, dst net.Conn) {
	defer func() {
		src.Close()
		dst.Close()
		p.mu.Lock()
		delete(p.conns, src)
		delete(p.conns, dst)
		p.mu.Unlock()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		for p.silent.Load() && !p.closed.Load() {
			time.Sleep(10 * time.Millisecond) // hold the bytes: the peer hears nothing
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Cut closes every open connection, as a network failure or a restarted
// load balancer would.
func (p *proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// Silence stops forwarding without closing anything; Speak resumes.
func (p *proxy) Silence() { p.silent.Store(true) }
func (p *proxy) Speak()   { p.silent.Store(false) }

// count returns the number of open connections (both sides).
func (p *proxy) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}
