package status

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/pgsession"
)

// failoverSinceNum is server_version_num of the first release with
// failover slots (PostgreSQL 17; replication.FailoverSince).
const failoverSinceNum = 170000

// Failover is the failover slot (RELAY_FAILOVER_SLOT): whether it is asked
// for, whether the server has failover slots, and whether the standbys
// among RELAY_DATABASE_URL's hosts keep a synced copy. It is informational:
// an unsynced copy makes neither `status` fail nor /readyz unready.
type Failover struct {
	Wanted bool `json:"wanted"`
	// ServerVersion is the primary's server_version ("15.20"); empty when
	// not wanted (nothing is read then).
	ServerVersion string `json:"server_version,omitempty"`
	Supported     bool   `json:"supported"`
	// SlotFailover is the primary's pg_replication_slots.failover; nil
	// when unsupported or the slot does not exist.
	SlotFailover *bool `json:"slot_failover"`
	// Standbys are the URL's hosts in recovery, read when the slot is a
	// failover slot.
	Standbys []StandbyCopy `json:"standbys"`
}

// StandbyCopy is one standby's copy of the slot.
type StandbyCopy struct {
	Host string `json:"host"` // host:port as the URL names it
	// HasCopy: the standby has a slot of that name (pg_replication_slots).
	HasCopy bool `json:"has_copy"`
	// Synced is the standby's pg_replication_slots.synced (17+): the copy
	// is kept by the slot sync worker, so a promoted standby has it.
	Synced            bool    `json:"synced"`
	ConfirmedFlushLSN *string `json:"confirmed_flush_lsn"`
	// Error says why the host could not be read; the other fields are
	// then unknown.
	Error string `json:"error,omitempty"`
}

// Summary is the failover slot's row in `status` and /readyz.
func (f *Failover) Summary() string {
	switch {
	case !f.Wanted:
		return "off"
	case !f.Supported:
		return fmt.Sprintf("not supported on server version %s (failover slots need PostgreSQL 17): an ordinary slot, "+
			"which a promoted standby does not have", f.ServerVersion)
	case f.SlotFailover == nil:
		return "on; the slot does not exist yet"
	case !*f.SlotFailover:
		return "on, but the slot is not a failover slot yet (the relay alters it when it next starts streaming)"
	case len(f.Standbys) == 0:
		return "on; no standby among RELAY_DATABASE_URL's hosts to read its copy from"
	}
	parts := make([]string, 0, len(f.Standbys))
	for _, s := range f.Standbys {
		switch {
		case s.Error != "":
			parts = append(parts, fmt.Sprintf("standby %s unreadable (%s)", s.Host, s.Error))
		case !s.HasCopy:
			parts = append(parts, fmt.Sprintf("standby %s has no copy", s.Host))
		case s.Synced:
			parts = append(parts, fmt.Sprintf("standby %s synced", s.Host))
		default:
			parts = append(parts, fmt.Sprintf("standby %s NOT synced", s.Host))
		}
	}
	return "on; " + strings.Join(parts, ", ")
}

// hostReader reads one host of the URL: whether it is a standby and, if
// so, its copy of the slot.
type hostReader func(ctx context.Context, host *pgx.ConnConfig, slot string) (standby bool, copy StandbyCopy, err error)

// ReadFailover reads the failover slot's state. Not wanted, it sends no
// query. Wanted on 17+ with a failover slot, it connects to each of
// dbURL's hosts (a multi-host URL: the primary and its standbys) and reads
// the copy on those in recovery.
func ReadFailover(ctx context.Context, primary querier, dbURL, slot string, wanted bool) (*Failover, error) {
	return readFailover(ctx, primary, dbURL, slot, wanted, readHost)
}

func readFailover(ctx context.Context, primary querier, dbURL, slot string, wanted bool, read hostReader) (*Failover, error) {
	f := &Failover{Wanted: wanted, Standbys: []StandbyCopy{}}
	if !wanted {
		return f, nil
	}
	var num int
	if err := primary.QueryRow(ctx, `SELECT current_setting('server_version'), current_setting('server_version_num')::int`).
		Scan(&f.ServerVersion, &num); err != nil {
		return nil, fmt.Errorf("read server_version: %w", err)
	}
	if i := strings.IndexByte(f.ServerVersion, ' '); i > 0 {
		f.ServerVersion = f.ServerVersion[:i] // "15.20 (Debian …)"
	}
	if f.Supported = num >= failoverSinceNum; !f.Supported {
		return f, nil
	}
	var on bool
	err := primary.QueryRow(ctx, `SELECT failover FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&on)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return f, nil
	case err != nil:
		return nil, fmt.Errorf("read pg_replication_slots.failover: %w", err)
	}
	f.SlotFailover = &on
	if !on {
		return f, nil
	}
	hosts, err := hostConfigs(dbURL)
	if err != nil {
		return nil, err
	}
	if len(hosts) < 2 {
		return f, nil // one host: the primary
	}
	for _, h := range hosts {
		standby, c, err := read(ctx, h, slot)
		c.Host = hostPort(h)
		switch {
		case err != nil:
			c.Error = err.Error()
		case !standby:
			continue // the primary, or another primary
		}
		f.Standbys = append(f.Standbys, c)
	}
	return f, nil
}

// hostConfigs splits a multi-host URL into one configuration per host,
// each without target_session_attrs' check: the standbys are wanted too.
func hostConfigs(dbURL string) ([]*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		return nil, errors.New("RELAY_DATABASE_URL is not a valid PostgreSQL connection string")
	}
	one := func(host string, port uint16, fb *pgconn.FallbackConfig) *pgx.ConnConfig {
		c := cfg.Copy()
		c.Host, c.Port = host, port
		if fb != nil {
			c.TLSConfig = fb.TLSConfig
		}
		c.Fallbacks, c.ValidateConnect = nil, nil
		c.ConnectTimeout = 5 * time.Second
		pgsession.Pool(&c.Config, pgsession.Bounds{Statement: 10 * time.Second})
		return c
	}
	out := []*pgx.ConnConfig{one(cfg.Host, cfg.Port, nil)}
	seen := map[string]bool{hostPort(out[0]): true}
	// Fallbacks repeat a host once per TLS attempt (sslmode=prefer).
	for _, fb := range cfg.Fallbacks {
		c := one(fb.Host, fb.Port, fb)
		if !seen[hostPort(c)] {
			seen[hostPort(c)] = true
			out = append(out, c)
		}
	}
	return out, nil
}

func hostPort(c *pgx.ConnConfig) string {
	return net.JoinHostPort(c.Host, strconv.Itoa(int(c.Port)))
}

// readHost connects to one host under the relay's session settings and
// reads whether it is in recovery and, if so, its copy of the slot.
func readHost(ctx context.Context, host *pgx.ConnConfig, slot string) (bool, StandbyCopy, error) {
	var c StandbyCopy
	conn, err := pgx.ConnectConfig(ctx, host)
	if err != nil {
		return false, c, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())
	var standby bool
	if err := conn.QueryRow(ctx, `SELECT pg_is_in_recovery()`).Scan(&standby); err != nil {
		return false, c, fmt.Errorf("pg_is_in_recovery: %w", err)
	}
	if !standby {
		return false, c, nil
	}
	err = conn.QueryRow(ctx, `SELECT synced, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slot).
		Scan(&c.Synced, &c.ConfirmedFlushLSN)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return true, c, nil
	case err != nil:
		return true, c, fmt.Errorf("read the standby's pg_replication_slots: %w", err)
	}
	c.HasCopy = true
	return true, c, nil
}
