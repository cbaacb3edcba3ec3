//go:build race

package relay

// raceEnabled: the race detector slows the simulator about tenfold, so
// TestSimulation runs fewer seeds by default under it.
const raceEnabled = true
