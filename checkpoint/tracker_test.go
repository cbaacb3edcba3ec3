package checkpoint

import (
	"math/rand/v2"
	"testing"

	"github.com/jackc/pglogrepl"
)

func TestDoneWaitsForEarlierTransactions(t *testing.T) {
	tr := New(100)
	a, b := tr.Begin(), tr.Begin()
	tr.Add(a)
	tr.Add(b)
	tr.Close(a, 200)
	tr.Close(b, 300)

	tr.Finish(b, 1)
	if got := tr.Done(); got != 100 {
		t.Fatalf("done moved to %s over unfinished transaction", got)
	}
	tr.Finish(a, 1)
	if got := tr.Done(); got != 300 {
		t.Fatalf("done = %s, want 0/12C", got)
	}
}

func TestOpenTransactionHoldsDone(t *testing.T) {
	tr := New(0)
	a := tr.Begin()
	tr.Add(a)
	tr.Finish(a, 1) // every event so far finished, but the commit is not seen yet
	if tr.Done() != 0 {
		t.Fatal("done moved before the transaction's commit was seen")
	}
	tr.Close(a, 50)
	if tr.Done() != 50 {
		t.Fatalf("done = %s, want 50", tr.Done())
	}
}

func TestEmptyTransactionAndSweep(t *testing.T) {
	tr := New(10)
	sweep := tr.Begin()
	tr.Add(sweep)
	tx := tr.Begin()
	tr.Close(tx, 40) // no events: finished at once, but behind the sweep
	tr.Close(sweep, 0)
	if tr.Done() != 10 {
		t.Fatal("done passed an unfinished sweep")
	}
	tr.Finish(sweep, 1)
	if tr.Done() != 40 {
		t.Fatalf("done = %d, want 40", tr.Done())
	}
}

func TestAdvanceIdle(t *testing.T) {
	tr := New(10)
	if !tr.AdvanceIdle(20) || tr.Done() != 20 {
		t.Fatal("idle tracker did not follow the WAL end")
	}
	a := tr.Begin()
	if tr.AdvanceIdle(30) || tr.Done() != 20 {
		t.Fatal("done followed the WAL end with a transaction open")
	}
	tr.Add(a)
	tr.Close(a, 25)
	if tr.AdvanceIdle(30) {
		t.Fatal("done followed the WAL end with an event in flight")
	}
	tr.Finish(a, 1)
	if !tr.AdvanceIdle(30) || tr.Done() != 30 {
		t.Fatal("done did not follow the WAL end once idle")
	}
	if tr.AdvanceIdle(5) || tr.Done() != 30 {
		t.Fatal("done moved backwards")
	}
}

func TestAcknowledgeNeverPassesDone(t *testing.T) {
	tr := New(0)
	a := tr.Begin()
	tr.Add(a)
	tr.Close(a, 70)
	if got := tr.Acknowledge(70); got != 0 {
		t.Fatalf("acknowledged %s before the transaction was done", got)
	}
	tr.Finish(a, 1)
	if got := tr.Acknowledge(70); got != 70 {
		t.Fatalf("acknowledged %s, want 70", got)
	}
}

// TestRandomCompletionOrder finishes events in random order and checks after
// every step that done equals the end of the longest finished prefix.
func TestRandomCompletionOrder(t *testing.T) {
	for seed := uint64(0); seed < 50; seed++ {
		rng := rand.New(rand.NewPCG(seed, 1))
		tr := New(0)
		type ev struct{ tx int }
		var txs []*Tx
		var ends []pglogrepl.LSN
		var events []ev
		remaining := map[int]int{}
		for i := 0; i < 200; i++ {
			tx := tr.Begin()
			n := rng.IntN(4)
			for j := 0; j < n; j++ {
				tr.Add(tx)
				events = append(events, ev{i})
			}
			remaining[i] = n
			end := pglogrepl.LSN((i + 1) * 10)
			tr.Close(tx, end)
			txs = append(txs, tx)
			ends = append(ends, end)
		}
		rng.Shuffle(len(events), func(i, j int) { events[i], events[j] = events[j], events[i] })
		check := func() {
			want := pglogrepl.LSN(0)
			for i := range txs {
				if remaining[i] > 0 {
					break
				}
				want = ends[i]
			}
			if got := tr.Done(); got != want {
				t.Fatalf("seed %d: done = %d, want %d (longest finished prefix)", seed, got, want)
			}
		}
		check()
		for _, e := range events {
			tr.Finish(txs[e.tx], 1)
			remaining[e.tx]--
			check()
		}
		if tr.InFlight() != 0 {
			t.Fatalf("seed %d: %d transactions still in flight", seed, tr.InFlight())
		}
	}
}

// BenchmarkTransaction is the tracker's work for one single-event
// transaction on the hot path.
func BenchmarkTransaction(b *testing.B) {
	tr := New(0)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		tx := tr.Begin()
		tr.Add(tx)
		tr.Close(tx, pglogrepl.LSN(i+1))
		tr.Finish(tx, 1)
	}
}

// TestEmptyTransactionsBehindStuckHead is a server before PostgreSQL 15,
// which sends BEGIN and COMMIT for every transaction in the database: while
// one event is unconfirmed, a busy database must not grow the tracker by an
// entry per transaction.
func TestEmptyTransactionsBehindStuckHead(t *testing.T) {
	tr := New(10)
	head := tr.Begin()
	tr.Add(head)
	tr.Close(head, 20)
	const empty = 1_000_000
	end := pglogrepl.LSN(20)
	for i := 0; i < empty; i++ {
		end += 10
		tx := tr.Begin()
		tr.Close(tx, end)
		if n := tr.InFlight(); n > 2 {
			t.Fatalf("after %d empty transactions behind an unfinished one the tracker holds %d entries, want at most 2", i+1, n)
		}
	}
	if got := tr.Done(); got != 10 {
		t.Fatalf("done = %s, passed the unfinished transaction", got)
	}
	tr.Finish(head, 1)
	if got := tr.Done(); got != end {
		t.Fatalf("done = %s, want %s (the end of the last empty transaction)", got, end)
	}
	if n := tr.InFlight(); n != 0 {
		t.Fatalf("%d entries in flight once everything is done", n)
	}
}

// TestEmptyTransactionsBetweenStuckOnes: the tracker's size is bounded by
// the transactions with events, whatever number of empty ones lie between
// them, and done stops at the right one.
func TestEmptyTransactionsBetweenStuckOnes(t *testing.T) {
	tr := New(0)
	var txs []*Tx
	var lastEmptyEnd []pglogrepl.LSN // end of the last empty transaction after txs[i]
	end := pglogrepl.LSN(0)
	for i := 0; i < 100; i++ {
		tx := tr.Begin()
		tr.Add(tx)
		end += 10
		tr.Close(tx, end)
		txs = append(txs, tx)
		for j := 0; j < 1000; j++ {
			end += 10
			tr.Close(tr.Begin(), end)
		}
		lastEmptyEnd = append(lastEmptyEnd, end)
	}
	if n := tr.InFlight(); n > len(txs)+1 {
		t.Fatalf("tracker holds %d entries for %d transactions with events", n, len(txs))
	}
	// Finish from the back: done must not move until the first one is done.
	for i := len(txs) - 1; i > 0; i-- {
		tr.Finish(txs[i], 1)
		if got := tr.Done(); got != 0 {
			t.Fatalf("done = %s with the first transaction unfinished", got)
		}
	}
	tr.Finish(txs[0], 1)
	if got, want := tr.Done(), lastEmptyEnd[len(lastEmptyEnd)-1]; got != want {
		t.Fatalf("done = %s, want %s", got, want)
	}
}

// TestEmptyTransactionsInOrder: done stops before an unfinished transaction
// and moves to the end of the empty transactions after each finished one.
func TestEmptyTransactionsInOrder(t *testing.T) {
	tr := New(0)
	a := tr.Begin()
	tr.Add(a)
	tr.Close(a, 10)
	tr.Close(tr.Begin(), 20)
	tr.Close(tr.Begin(), 30)
	b := tr.Begin()
	tr.Add(b)
	tr.Close(b, 40)
	tr.Close(tr.Begin(), 50)
	tr.Finish(a, 1)
	if got := tr.Done(); got != 30 {
		t.Fatalf("done = %s, want 30 (the empty transactions after the first, not past the second)", got)
	}
	tr.Finish(b, 1)
	if got := tr.Done(); got != 50 {
		t.Fatalf("done = %s, want 50", got)
	}
}

// TestRandomEmptyTransactionsInterleaved mixes many empty transactions
// with ones that have events, finishing events while the stream goes on,
// and checks after every step that done is the end of the longest finished
// prefix (empty transactions count as finished) and that the tracker holds
// no more entries than the transactions with events past that prefix (a
// finished one behind an unfinished one stays), plus one.
func TestRandomEmptyTransactionsInterleaved(t *testing.T) {
	for seed := uint64(0); seed < 50; seed++ {
		rng := rand.New(rand.NewPCG(seed, 2))
		tr := New(0)
		var ends []pglogrepl.LSN
		var remaining []int // per transaction, events not yet finished
		var txs []*Tx
		var open []int                      // transactions with unfinished events
		prefix, want := 0, pglogrepl.LSN(0) // the finished prefix only grows
		check := func(step string) {
			for prefix < len(ends) && remaining[prefix] == 0 {
				want = ends[prefix]
				prefix++
			}
			if got := tr.Done(); got != want {
				t.Fatalf("seed %d, %s: done = %d, want %d", seed, step, got, want)
			}
			withEvents := 0
			for _, tx := range txs[prefix:] {
				if tx.events {
					withEvents++
				}
			}
			if n := tr.InFlight(); n > withEvents+1 {
				t.Fatalf("seed %d, %s: %d entries for %d transactions with events not yet done", seed, step, n, withEvents)
			}
		}
		for i := 0; i < 2000; i++ {
			tx := tr.Begin()
			n := 0
			if rng.IntN(10) == 0 {
				n = 1 + rng.IntN(3)
			}
			for j := 0; j < n; j++ {
				tr.Add(tx)
			}
			end := pglogrepl.LSN((i + 1) * 10)
			tr.Close(tx, end)
			txs = append(txs, tx)
			ends = append(ends, end)
			remaining = append(remaining, n)
			if n > 0 {
				open = append(open, i)
			}
			check("after a commit")
			for len(open) > 0 && rng.IntN(3) == 0 {
				k := rng.IntN(len(open))
				j := open[k]
				tr.Finish(txs[j], 1)
				remaining[j]--
				if remaining[j] == 0 {
					open = append(open[:k], open[k+1:]...)
				}
				check("after a finish")
			}
		}
		for len(open) > 0 {
			j := open[0]
			tr.Finish(txs[j], remaining[j])
			remaining[j] = 0
			open = open[1:]
			check("draining")
		}
		if got, want := tr.Done(), ends[len(ends)-1]; got != want {
			t.Fatalf("seed %d: done = %d at the end, want %d", seed, got, want)
		}
	}
}
