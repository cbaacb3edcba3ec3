package config

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/decoder"
)

// reservedHeaders are the headers the relay sets itself that a column
// could be named (compared case-insensitively, as NATS headers are); the
// others have a "-" (Nats-Msg-Id, Content-Type, x-outbox-*, Outbox-*),
// which a plain column name cannot, and CloudEvents' prefixes are checked
// apart.
var reservedHeaders = []string{"aggregate_type", "aggregate_id", "occurred_at", "traceparent", "tracestate", "tombstone", "type",
	// RabbitMQ reads CC and BCC as sender-selected routing (arrays of
	// routing keys) and closes the channel on any other value.
	"cc", "bcc"}

var columnName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_$]{0,62}$`)

// Columns is RELAY_COLUMNS and RELAY_HEADER_COLUMNS together.
func (c *Config) Columns() (decoder.Columns, error) {
	cols, err := decoder.ParseColumns(c.ColumnsSpec)
	if err != nil {
		return cols, fmt.Errorf("RELAY_COLUMNS: %w", err)
	}
	if strings.TrimSpace(c.HeaderColumns) == "" {
		return cols, nil
	}
	mapped := map[string]string{}
	for _, f := range decoder.ColumnFields {
		if v := cols.Column(f); v != "" {
			mapped[v] = f
		}
	}
	seen := map[string]bool{}
	for _, h := range strings.Split(c.HeaderColumns, ",") {
		h = strings.TrimSpace(h)
		switch {
		case !columnName.MatchString(h):
			return cols, fmt.Errorf("RELAY_HEADER_COLUMNS: %q is not a plain column name (letters, digits, _ and $, at most 63 bytes)", h)
		case seen[strings.ToLower(h)]:
			return cols, fmt.Errorf("RELAY_HEADER_COLUMNS: %q is listed twice (header names are compared without case: NATS headers are case-insensitive)", h)
		case mapped[h] != "":
			return cols, fmt.Errorf("RELAY_HEADER_COLUMNS: %q is already the %s column (RELAY_COLUMNS)", h, mapped[h])
		case h == "published_at" || h == "relay_seq":
			return cols, fmt.Errorf("RELAY_HEADER_COLUMNS: %q is the relay's own column", h)
		}
		for _, r := range reservedHeaders {
			if strings.EqualFold(h, r) {
				return cols, fmt.Errorf("RELAY_HEADER_COLUMNS: %q is a header the relay sets itself", h)
			}
		}
		if l := strings.ToLower(h); strings.HasPrefix(l, "cloudevents_") || strings.HasPrefix(l, "ce_") {
			return cols, fmt.Errorf("RELAY_HEADER_COLUMNS: %q takes a CloudEvents header prefix", h)
		}
		seen[strings.ToLower(h)] = true
		cols.Headers = append(cols.Headers, h)
	}
	return cols, nil
}

// CloudEventsSourceAttr is RELAY_CLOUDEVENTS_SOURCE, or when it is empty a
// source derived from the database and the table:
// "outbox-relay:<database>/<schema>.<table>" (a URI; no host, user or
// password, which are not the consumer's business).
func (c *Config) CloudEventsSourceAttr() string {
	if c.CloudEventsSource != "" {
		return c.CloudEventsSource
	}
	db := "postgres"
	if pc, err := pgconn.ParseConfig(c.DatabaseURL); err == nil && pc.Database != "" {
		db = pc.Database
	}
	schema, table, err := SplitTable(c.Table)
	if err != nil {
		schema, table = "public", c.Table
	}
	return "outbox-relay:" + url.PathEscape(db) + "/" + url.PathEscape(schema+"."+table)
}

// TimeColumn is the table's event-time column, "" when RELAY_COLUMNS has
// none (the configuration is validated: the error cannot happen then).
func (c *Config) TimeColumn() string {
	cols, _ := c.Columns()
	return cols.OccurredAt
}
