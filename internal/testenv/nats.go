package testenv

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// EnvNATSURL is a NATS server with JetStream, e.g. nats://127.0.0.1:4222.
// Without it, NATS starts the natsImage container when Docker answers, like
// Postgres and AMQP.
const EnvNATSURL = "OUTBOX_TEST_NATS_URL"

// natsImage matches docker-compose.yml.
const natsImage = "nats:2-alpine"

var natsSrv struct {
	once sync.Once
	url  string
	err  error
}

// NATS returns the URL of a NATS server with JetStream enabled. Tests share
// it, so name streams and subjects with Name and delete them when done.
func NATS(t testing.TB) string {
	t.Helper()
	if u := os.Getenv(EnvNATSURL); u != "" {
		return u
	}
	natsSrv.once.Do(func() { natsSrv.url, natsSrv.err = startNATS() })
	if natsSrv.err != nil {
		t.Fatalf("testenv: %s is not set and %v.\nSet %s=nats://127.0.0.1:4222 (a nats-server started with -js) "+
			"or run `make test`, which configures the local services", EnvNATSURL, natsSrv.err, EnvNATSURL)
	}
	return natsSrv.url
}

func startNATS() (string, error) {
	if !dockerAvailable() {
		return "", errNoDocker
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := testcontainers.GenericContainer(ctx, testcontainers.GenericContainerRequest{
		ContainerRequest: testcontainers.ContainerRequest{
			Image:        natsImage,
			Cmd:          []string{"-js"},
			ExposedPorts: []string{"4222/tcp"},
			WaitingFor:   wait.ForLog("Server is ready"),
		},
		Started: true,
	})
	if err != nil {
		return "", fmt.Errorf("Docker answers but the %s container did not start: %w", natsImage, err)
	}
	ep, err := c.PortEndpoint(ctx, "4222/tcp", "nats")
	if err != nil {
		return "", fmt.Errorf("%s container: %w", natsImage, err)
	}
	return ep, nil
}
