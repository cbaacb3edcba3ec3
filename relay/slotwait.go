package relay

import (
	"context"
	"time"

	relaystatus "github.com/outbox-relay/outbox-relay/status"
)

// slotWaitFirst and slotWaitEvery pace the reports of a slot creation that
// waits: CREATE_REPLICATION_SLOT returns only once every transaction that
// holds a transaction id has ended, in every database of the server, and
// one left open (an idle session mid-transaction, a forgotten prepared
// transaction) holds it for as long as it stays open.
var (
	slotWaitFirst = 2 * time.Second
	slotWaitEvery = 5 * time.Second
)

// watchSlotCreation reports, until the returned stop is called, what the
// slot's creation waits for: in the log every few seconds, and in /readyz.
func (r *Relay) watchSlotCreation(ctx context.Context, walsender uint32) (stop func()) {
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTimer(slotWaitFirst)
		defer t.Stop()
		began := time.Now()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			qctx, qcancel := context.WithTimeout(wctx, r.cfg.PostgresTimeout)
			bs, err := relaystatus.Blockers(qctx, r.opt.Pool, walsender)
			qcancel()
			if wctx.Err() != nil {
				return
			}
			why := relaystatus.DescribeBlockers(bs)
			if err != nil {
				why = "waiting for transactions that hold a transaction id to end (" + err.Error() + ")"
			}
			r.m.SetReady(false, "creating replication slot "+r.cfg.Slot+": "+why)
			ev := r.log.Warn().Str("slot", r.cfg.Slot).Dur("waited", time.Since(began).Round(time.Second))
			if len(bs) > 0 {
				ev = ev.Interface("transactions", bs)
			}
			ev.Msg("creating the replication slot: " + why +
				"; PostgreSQL creates a logical slot only once these have ended (pg_terminate_backend(pid) ends one)")
			t.Reset(slotWaitEvery)
		}
	}()
	return func() {
		cancel()
		<-done
	}
}
