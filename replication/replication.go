package replication

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outbox-relay/outbox-relay/internal/pgquote"
	"github.com/outbox-relay/outbox-relay/internal/pgsession"
)

// SQLSTATEs the relay reacts to.
const (
	CodeObjectInUse     = pgerrcode.ObjectInUse     // the slot is active for another process
	CodeUndefinedObject = pgerrcode.UndefinedObject // no such slot or publication
	CodeDuplicateObject = pgerrcode.DuplicateObject // the slot already exists
)

// HasCode reports whether err carries the given SQLSTATE.
func HasCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}

// SlotInUse reports whether err says another process streams from the slot.
func SlotInUse(err error) bool { return HasCode(err, CodeObjectInUse) }

// Conn is a replication connection.
type Conn struct {
	pg          *pgconn.PgConn
	deadline    time.Time // the read deadline last set by Receive; zero: unknown
	interrupted atomic.Bool
	streaming   atomic.Bool // Start succeeded: Wake may move the read deadline
	woken       atomic.Bool

	w        commander // pg's simple-protocol commands, for slot setup (failover.go)
	failover bool      // WithFailoverSlot
	// createdFailover: CreateSlot made the slot with FAILOVER, so Start
	// need not check it.
	createdFailover bool
}

// PID returns the server process id of the walsender serving this
// connection, as pg_stat_replication.pid shows it.
func (c *Conn) PID() uint32 { return c.pg.PID() }

// ErrWoken is returned by Receive after Wake.
var ErrWoken = errors.New("replication receive woken")

// Wake makes a Receive in progress, or the next one, return ErrWoken once,
// so that the goroutine owning the connection can act on news from another
// goroutine (a finished transaction to acknowledge at once). It does
// nothing before streaming starts, when a moved deadline would break a
// command. Safe to call from another goroutine.
func (c *Conn) Wake() {
	if !c.streaming.Load() {
		return
	}
	c.woken.Store(true)
	_ = c.pg.Conn().SetReadDeadline(time.Now())
}

// Interrupt makes a Receive in progress, and every later one, return
// ErrTimeout at once: a stop need not wait for the next message or status
// interval. Safe to call from another goroutine.
func (c *Conn) Interrupt() {
	c.interrupted.Store(true)
	_ = c.pg.Conn().SetReadDeadline(time.Now())
}

// forgetDeadline makes the next Receive set its deadline again: a call with
// a context that gets cancelled has pgconn move or clear the deadline.
func (c *Conn) forgetDeadline() { c.deadline = time.Time{} }

// Config returns the replication connection's configuration derived from a
// normal database URL: same server, user and TLS settings, plus
// replication=database, UTC and ISO dates (the decoder parses timestamps in
// that form).
func Config(databaseURL, applicationName string) (*pgconn.Config, error) {
	cfg, err := pgconn.ParseConfig(databaseURL)
	if err != nil {
		return nil, errors.New("RELAY_DATABASE_URL is not a valid PostgreSQL connection string")
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = applicationName
	cfg.RuntimeParams["TimeZone"] = "UTC"
	cfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 15 * time.Second
	}
	pgsession.Replication(cfg)
	return cfg, nil
}

// Connect opens a replication connection.
func Connect(ctx context.Context, cfg *pgconn.Config, opts ...Option) (*Conn, error) {
	pg, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open replication connection: %w", err)
	}
	c := &Conn{pg: pg, w: pgWire{pg}}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// IdentifySystem runs IDENTIFY_SYSTEM.
func (c *Conn) IdentifySystem(ctx context.Context) (pglogrepl.IdentifySystemResult, error) {
	c.forgetDeadline()
	r, err := pglogrepl.IdentifySystem(ctx, c.pg)
	if err != nil {
		return r, fmt.Errorf("IDENTIFY_SYSTEM: %w", err)
	}
	return r, nil
}

// Slot is a created slot and the snapshot it exported.
type Slot struct {
	ConsistentPoint pglogrepl.LSN
	// Snapshot is valid only until the next command on this connection.
	Snapshot string
}

// CreateSlot creates a pgoutput slot and exports its snapshot: rows visible
// in that snapshot will never come through the slot, everything committed
// after it will. With WithFailoverSlot on a server of 17 or later, the slot
// is a failover slot (createSlotSQL).
func (c *Conn) CreateSlot(ctx context.Context, name string) (Slot, error) {
	c.forgetDeadline()
	failover := c.failoverOn()
	results, err := c.w.Run(ctx, createSlotSQL(name, failover))
	if err != nil {
		return Slot{}, fmt.Errorf("create replication slot %q: %w", name, err)
	}
	res, err := parseCreated(results)
	if err != nil {
		return Slot{}, fmt.Errorf("create replication slot %q: %w", name, err)
	}
	c.createdFailover = failover
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return Slot{}, fmt.Errorf("create replication slot %q: consistent point: %w", name, err)
	}
	return Slot{ConsistentPoint: lsn, Snapshot: res.SnapshotName}, nil
}

// Start begins streaming from the slot. A zero start LSN resumes at the
// slot's confirmed position. With WithFailoverSlot on 17 or later, it first
// makes a slot created without FAILOVER a failover slot
// (ALTER_REPLICATION_SLOT); a failure to do so is Start's error.
func (c *Conn) Start(ctx context.Context, slot, publication string, start pglogrepl.LSN) error {
	c.forgetDeadline()
	if err := c.ensureFailover(ctx, slot); err != nil {
		return err
	}
	// pgoutput splits publication_names like an identifier list.
	pubs := pgquote.Literal(pgx.Identifier{publication}.Sanitize())
	err := pglogrepl.StartReplication(ctx, c.pg, slot, start, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names " + pubs},
	})
	if err != nil {
		return fmt.Errorf("START_REPLICATION on slot %q: %w", slot, err)
	}
	c.streaming.Store(true)
	return nil
}

// Message is one message from the stream.
type Message struct {
	// Keepalive is true for a primary keepalive; Data is nil then.
	Keepalive      bool
	ReplyRequested bool
	WALStart       pglogrepl.LSN
	ServerWALEnd   pglogrepl.LSN
	// Data is the pgoutput message. It is only valid until the next Receive.
	Data []byte
}

// ErrTimeout is returned by Receive when the deadline passes first.
var ErrTimeout = errors.New("no replication message before the deadline")

// Receive reads the next message, waiting at most until deadline.
func (c *Conn) Receive(deadline time.Time) (Message, error) {
	if c.woken.Swap(false) {
		c.forgetDeadline() // Wake moved it
		return Message{}, ErrWoken
	}
	// The deadline changes once per status interval, not per message:
	// resetting the socket's timer for every message costs a few percent.
	if !deadline.Equal(c.deadline) {
		if err := c.pg.Conn().SetReadDeadline(deadline); err != nil {
			return Message{}, fmt.Errorf("set read deadline: %w", err)
		}
		c.deadline = deadline
	}
	// After setting the deadline: an Interrupt or a Wake that came before
	// it is seen here (the deadline just set overwrote the one they moved),
	// and one that comes after it moves the deadline to now.
	if c.interrupted.Load() {
		return Message{}, ErrTimeout
	}
	if c.woken.Swap(false) {
		c.forgetDeadline()
		return Message{}, ErrWoken
	}
	for {
		raw, err := c.pg.ReceiveMessage(context.Background())
		if err != nil {
			if pgconn.Timeout(err) {
				// The deadline may have been moved by Wake: set it again
				// next time.
				c.forgetDeadline()
				if c.woken.Swap(false) {
					return Message{}, ErrWoken
				}
				return Message{}, ErrTimeout
			}
			return Message{}, fmt.Errorf("receive from replication stream: %w", err)
		}
		switch msg := raw.(type) {
		case *pgproto3.CopyData:
			if len(msg.Data) == 0 {
				return Message{}, errors.New("replication stream: empty CopyData")
			}
			switch msg.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
				if err != nil {
					return Message{}, fmt.Errorf("parse keepalive: %w", err)
				}
				return Message{Keepalive: true, ReplyRequested: ka.ReplyRequested, ServerWALEnd: ka.ServerWALEnd}, nil
			case pglogrepl.XLogDataByteID:
				x, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return Message{}, fmt.Errorf("parse XLogData: %w", err)
				}
				return Message{WALStart: x.WALStart, ServerWALEnd: x.ServerWALEnd, Data: x.WALData}, nil
			}
		case *pgproto3.ErrorResponse:
			return Message{}, fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(msg))
		case *pgproto3.CopyDone:
			return Message{}, errors.New("replication stream ended by the server")
		}
		// Anything else (notices, parameter status) is ignored.
	}
}

// SendStatus sends a standby status update acknowledging pos as written,
// flushed and applied.
func (c *Conn) SendStatus(pos pglogrepl.LSN, replyRequested bool) error {
	if c.pg.IsClosed() {
		// A failed receive closes the connection in a goroutine of pgconn's
		// that writes its Terminate: writing now would race with it.
		return errors.New("send standby status: the replication connection is closed")
	}
	err := pglogrepl.SendStandbyStatusUpdate(context.Background(), c.pg, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pos,
		WALFlushPosition: pos,
		WALApplyPosition: pos,
		ClientTime:       time.Now(),
		ReplyRequested:   replyRequested,
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	return nil
}

// Close closes the connection.
func (c *Conn) Close(ctx context.Context) error {
	return c.pg.Close(ctx)
}
