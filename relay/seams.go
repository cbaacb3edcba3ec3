package relay

import (
	"context"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/outbox-relay/outbox-relay/decoder"
	"github.com/outbox-relay/outbox-relay/replication"
)

// The engine meets its collaborators through the interfaces below, declared
// here where they are used. The real ones are *replication.Conn (stream),
// the Relay's own PostgreSQL methods (store) and a sink.Publisher. The
// simulator (sim_test.go) replaces all three with fakes driven by a seed.

// stream is the replication connection: start from an LSN, receive
// messages and keepalives, send status.
type stream interface {
	PID() uint32
	IdentifySystem(ctx context.Context) (pglogrepl.IdentifySystemResult, error)
	CreateSlot(ctx context.Context, name string) (replication.Slot, error)
	Start(ctx context.Context, slot, publication string, start pglogrepl.LSN) error
	Receive(deadline time.Time) (replication.Message, error)
	SendStatus(pos pglogrepl.LSN, replyRequested bool) error
	// Wake makes one Receive return replication.ErrWoken; Interrupt makes
	// every Receive from now on return replication.ErrTimeout at once.
	Wake()
	Interrupt()
	Close(ctx context.Context) error
}

// ownership is a relay's claim on its slot (owner.go).
type ownership interface {
	Lost() <-chan struct{}
	release()
}

// sweepCursor reads the unpublished rows of the slot's snapshot in sweep
// order (sweepOrders), n at a time; none once every row was read.
type sweepCursor interface {
	next(ctx context.Context, n int) ([]decoder.Row, error)
	close()
}

// store is the database apart from the replication stream: the slot's
// state, the table's rows and the relay's own tables.
type store interface {
	claim(ctx context.Context) (ownership, error)
	preflight(ctx context.Context) (slotInfo, error)
	dropSlot(ctx context.Context) error
	sweepPending(ctx context.Context) (bool, error)
	setSweepPending(ctx context.Context, pending bool) error
	watchSlotCreation(ctx context.Context, walsender uint32) (stop func())
	beginSweep(ctx context.Context, snapshot string) (sweepCursor, error)
	// markRows sets published_at on (or, RELAY_ON_PUBLISHED=delete,
	// deletes) the visible, unmarked rows of ids and returns the ids it
	// reached.
	// through is the batch's last stream position (delete mode's deleted_through).
	markRows(ctx context.Context, ids []string, through streamPos) ([]string, error)
	// publishedRows returns the ids already marked, or recorded as
	// confirmed for this slot.
	publishedRows(ctx context.Context, ids []string) ([]string, error)
	// replayRows sorts replayed ids (xids: their transactions) into done
	// (as publishedRows, or deleted by RELAY_ON_PUBLISHED=delete) and gone
	// (no longer in the table, unknown whether published).
	// pos are their stream positions, against delete mode's deleted_through.
	replayRows(ctx context.Context, ids []string, xids []int64, pos []streamPos) (done, gone []string, err error)
	// rowsGone returns the ids whose transaction (0 for a swept row) is
	// visible and whose row is not there: deleted before its mark.
	rowsGone(ctx context.Context, ids []string, xids []int64) ([]string, error)
	// markOrRecord marks the visible rows of ids and records as confirmed
	// those of recIDs (with their xids) whose transaction is not visible.
	markOrRecord(ctx context.Context, ids, recIDs []string, xids []int64, through streamPos) (done []string, recorded int, err error)
	countRecorded(ctx context.Context) (int, error)
	// completeRecorded marks the recorded rows now visible and deletes
	// their records; gone are records of rows deleted.
	completeRecorded(ctx context.Context) (n int, gone []string, err error)
	readSyncState(ctx context.Context, walsender uint32) (syncReading, error)
	emitHeartbeat(ctx context.Context) (pglogrepl.LSN, error)
	// openBarrier connects a session's barrier, which the synchronous
	// standbys must confirm before streamed events go out (standby.go).
	openBarrier(ctx context.Context) (barrier, error)
}

// connectStream opens the real replication connection.
func (r *Relay) connectStream(ctx context.Context) (stream, error) {
	c, err := replication.Connect(ctx, r.opt.Replication, replication.WithFailoverSlot(r.cfg.FailoverSlot))
	if err != nil {
		return nil, err
	}
	return c, nil
}
