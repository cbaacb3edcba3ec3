package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCostTableAndPicture: the database cost table gives each design's
// figures and judges the targets on the ratios, and the picture
// draws with the cost panel.
func TestCostTableAndPicture(t *testing.T) {
	c := func(ins, own, cpuIns, cpuOwn float64) drainRun {
		return drainRun{Rate: 1000, Cost: dbCost{WALInsertBytes: ins, WALOwnBytes: own, OwnToInsert: own / ins,
			CPUInsertMs: cpuIns, CPUOwnMs: cpuOwn, DeadTuplesPer1k: 1000}}
	}
	r := &results{
		Drain:       []drainRun{c(550, 560, 20, 30), c(560, 550, 20, 30), c(555, 555, 20, 30)},
		DrainDelete: []drainRun{c(550, 60, 20, 10), c(560, 55, 20, 12), c(555, 58, 20, 11)},
		Poll:        []drainRun{c(550, 600, 20, 200)},
	}
	r.Options.N, r.Options.Repeat = 100, 3
	r.Latency = []*latencyScenario{{Design: "relay", Rate: 1000, TxRows: 1,
		Runs: []latencyRun{{samples: []int64{400_000, 500_000, 900_000, 2_000_000}}}}}
	var b strings.Builder
	r.costTable(func(f string, a ...any) { fmt.Fprintf(&b, f, a...) })
	out := b.String()
	for _, want := range []string{
		"| relay, `delete` | 1,000 | 555 | 58 | 0.10 |",
		"| `delete`: own WAL ÷ insert WAL | 0.10 |",
		"≤ 0.20 | yes |",
		"| `mark`: own WAL ÷ insert WAL | 1.00 |",
		"≤ 0.60 | **no** |",
		"(insert + drain), `delete` ÷ `mark` | 0.62 |",
		"the drain's share alone (walsender, the relay's statements), `delete` ÷ `mark` | 0.37 |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("cost table lacks %q:\n%s", want, out)
		}
	}
	path := filepath.Join(t.TempDir(), "bench.png")
	if err := r.writePNG(path); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Size() < 1000 {
		t.Fatalf("picture not written: %v", err)
	}
}
