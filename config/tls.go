package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// AMQPTLS builds the TLS configuration for amqps:// from RELAY_AMQP_CA_FILE
// and the optional client certificate (RELAY_AMQP_CERT_FILE and
// RELAY_AMQP_KEY_FILE). It returns nil when none is set: amqps:// then
// verifies against the system roots.
func (c *Config) AMQPTLS() (*tls.Config, error) {
	if c.AMQPCAFile == "" && c.AMQPCertFile == "" && c.AMQPKeyFile == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.AMQPCAFile != "" {
		pem, err := os.ReadFile(c.AMQPCAFile)
		if err != nil {
			return nil, fmt.Errorf("RELAY_AMQP_CA_FILE: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("RELAY_AMQP_CA_FILE: no PEM certificate found")
		}
		cfg.RootCAs = pool
	}
	if (c.AMQPCertFile == "") != (c.AMQPKeyFile == "") {
		return nil, errors.New("RELAY_AMQP_CERT_FILE and RELAY_AMQP_KEY_FILE must be set together")
	}
	if c.AMQPCertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.AMQPCertFile, c.AMQPKeyFile)
		if err != nil {
			return nil, fmt.Errorf("RELAY_AMQP_CERT_FILE/RELAY_AMQP_KEY_FILE: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}
