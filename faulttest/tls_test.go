//go:build faults

package faulttest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// pki is a throwaway CA with a server certificate for 127.0.0.1 and a
// client certificate, written as PEM files.
type pki struct {
	dir                           string
	caFile, serverCert, serverKey string
	clientCert, clientKey         string
	caPool                        *x509.CertPool
	serverPair                    tls.Certificate
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	// Readable by the postgres user (t.TempDir's parent is private).
	dir, err := os.MkdirTemp("", "outbox-relay-pki")
	must(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	must(t, os.Chmod(dir, 0o755))
	p := &pki{dir: dir, caPool: x509.NewCertPool()}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "outbox-relay test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	must(t, err)
	ca, err := x509.ParseCertificate(caDER)
	must(t, err)
	p.caPool.AddCert(ca)
	p.caFile = p.write(t, "ca.pem", "CERTIFICATE", caDER)
	issue := func(name string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(t, err)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		must(t, err)
		keyDER, err := x509.MarshalECPrivateKey(key)
		must(t, err)
		return p.write(t, name+".pem", "CERTIFICATE", der), p.write(t, name+".key", "EC PRIVATE KEY", keyDER)
	}
	p.serverCert, p.serverKey = issue("server", 2, x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = issue("client", 3, x509.ExtKeyUsageClientAuth)
	p.serverPair, err = tls.LoadX509KeyPair(p.serverCert, p.serverKey)
	must(t, err)
	return p
}

func (p *pki) write(t *testing.T, name, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	must(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
	return path
}

// tlsProxy terminates TLS (client certificate required) in front of a
// plaintext upstream: an amqps:// broker for the relay.
func tlsProxy(t *testing.T, p *pki, upstream string) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{p.serverPair}, ClientCAs: p.caPool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12,
	})
	must(t, err)
	t.Cleanup(func() { ln.Close() })
	pr := &proxy{conns: map[net.Conn]struct{}{}}
	t.Cleanup(pr.Cut)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.DialTimeout("tcp", upstream, 5*time.Second)
			if err != nil {
				c.Close()
				continue
			}
			pr.mu.Lock()
			pr.conns[c], pr.conns[u] = struct{}{}, struct{}{}
			pr.mu.Unlock()
			go pr.pipe(c, u)
			go pr.pipe(u, c)
		}
	}()
	return ln.Addr().String()
}

// TestTLSToBothSides runs the relay with PostgreSQL over TLS
// (sslmode=verify-full, sslrootcert) and RabbitMQ over amqps:// with
// RELAY_AMQP_CA_FILE and a client certificate. PostgreSQL's ssl settings are
// reloadable, so the test turns TLS on for the server and back off after.
func TestTLSToBothSides(t *testing.T) {
	w := newWorld(t)
	p := newPKI(t)
	ctx := context.Background()

	pgUser, err := user.Lookup("postgres")
	must(t, err)
	uid, _ := strconv.Atoi(pgUser.Uid)
	gid, _ := strconv.Atoi(pgUser.Gid)
	for _, f := range []string{p.serverCert, p.serverKey, p.caFile} {
		must(t, os.Chown(f, uid, gid))
	}
	for _, q := range []string{
		`ALTER SYSTEM SET ssl_cert_file = ` + quote(p.serverCert),
		`ALTER SYSTEM SET ssl_key_file = ` + quote(p.serverKey),
		`ALTER SYSTEM SET ssl = on`,
		`SELECT pg_reload_conf()`,
	} {
		_, err := w.pool.Exec(ctx, q)
		must(t, err)
	}
	t.Cleanup(func() {
		for _, q := range []string{`ALTER SYSTEM RESET ssl`, `ALTER SYSTEM RESET ssl_cert_file`,
			`ALTER SYSTEM RESET ssl_key_file`, `SELECT pg_reload_conf()`} {
			if _, err := w.pool.Exec(context.Background(), q); err != nil {
				t.Errorf("%s: %v", q, err)
			}
		}
	})
	dbTLS := w.dbURL[:len(w.dbURL)-len("sslmode=disable")] + "sslmode=verify-full&sslrootcert=" + p.caFile
	w.waitFor(10*time.Second, "PostgreSQL to serve the test certificate", func() bool {
		c, err := pgx.Connect(ctx, dbTLS)
		if err != nil {
			return false
		}
		c.Close(ctx)
		return true
	})

	amqps := "amqps://guest:guest@" + tlsProxy(t, p, hostPort(w.amqpURL)) + "/"
	r := w.startRelay("RELAY_DATABASE_URL="+dbTLS, "RELAY_AMQP_URL="+amqps, "RELAY_AMQP_CA_FILE="+p.caFile,
		"RELAY_AMQP_CERT_FILE="+p.clientCert, "RELAY_AMQP_KEY_FILE="+p.clientKey)
	prod := w.produce(5 * time.Millisecond)
	w.waitFor(20*time.Second, "events to flow over TLS", func() bool { return w.received() > 100 })
	prod.halt()
	events, lost, dups := w.verify(60 * time.Second)
	t.Logf("TLS to PostgreSQL and RabbitMQ: %d events, %d lost, %d duplicated", events, lost, dups)

	var tlsConns int
	must(t, w.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
		WHERE s.ssl AND a.application_name = 'outbox-relay'`).Scan(&tlsConns))
	if tlsConns < 2 {
		t.Fatalf("%d of the relay's connections use TLS, want the pool and the walsender", tlsConns)
	}
	if code := r.term(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exited %d", code)
	}
}

func quote(s string) string { return "'" + s + "'" }
