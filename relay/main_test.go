package relay

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves goroutines behind: sessions,
// sinks and replication connections must all be torn down.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
