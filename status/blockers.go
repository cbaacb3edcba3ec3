package status

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Querier is what Blockers needs of a pool or a connection.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Blocker is a transaction that the creation of a logical slot waits for.
// CREATE_REPLICATION_SLOT returns only once every transaction that holds a
// transaction id when it starts has ended, in every database of the
// server, prepared transactions included.
type Blocker struct {
	PID             int32   `json:"pid"` // 0 for a prepared transaction
	Database        string  `json:"database"`
	ApplicationName string  `json:"application_name"`
	State           string  `json:"state"`
	ClientAddr      string  `json:"client_addr"`
	AgeSeconds      float64 `json:"age_seconds"`
	PreparedGID     string  `json:"prepared_gid,omitempty"`
}

func (b Blocker) String() string {
	age := time.Duration(b.AgeSeconds * float64(time.Second)).Round(time.Second)
	if b.PreparedGID != "" {
		return fmt.Sprintf("prepared transaction %q in database %s, prepared %s ago (COMMIT PREPARED or ROLLBACK PREPARED it)",
			b.PreparedGID, b.Database, age)
	}
	return fmt.Sprintf("pid %d (database %s, application_name %q, %s, transaction open for %s, client %s)",
		b.PID, b.Database, b.ApplicationName, b.State, age, b.ClientAddr)
}

// Blockers lists the transactions holding a transaction id, oldest first,
// except the session of walsenderPID (the one creating the slot, or 0).
func Blockers(ctx context.Context, q Querier, walsenderPID uint32) ([]Blocker, error) {
	rows, err := q.Query(ctx, `
		SELECT pid, coalesce(datname, ''), coalesce(application_name, ''), coalesce(state, ''),
			coalesce(host(client_addr), 'local'), extract(epoch FROM now() - xact_start)::float8, ''
		FROM pg_stat_activity
		WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND pid <> $1
		UNION ALL
		SELECT 0, database, '', 'prepared', '', extract(epoch FROM now() - prepared)::float8, gid
		FROM pg_prepared_xacts
		ORDER BY 6 DESC NULLS LAST
		LIMIT 20`, int64(walsenderPID))
	if err != nil {
		return nil, fmt.Errorf("read pg_stat_activity: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Blocker, error) {
		var b Blocker
		var age *float64
		err := r.Scan(&b.PID, &b.Database, &b.ApplicationName, &b.State, &b.ClientAddr, &age, &b.PreparedGID)
		if age != nil {
			b.AgeSeconds = *age
		}
		return b, err
	})
	if err != nil {
		return nil, fmt.Errorf("read pg_stat_activity: %w", err)
	}
	return out, nil
}

// DescribeBlockers says in one line what slot creation waits for.
func DescribeBlockers(bs []Blocker) string {
	if len(bs) == 0 {
		return "waiting for transactions that hold a transaction id to end"
	}
	parts := make([]string, len(bs))
	for i, b := range bs {
		parts[i] = b.String()
	}
	return fmt.Sprintf("waiting for %d transaction(s) to end: %s", len(bs), strings.Join(parts, "; "))
}
