// Package config reads the relay's configuration from RELAY_* environment
// variables and validates it up front, with errors that name the variable.
package config

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"strings"
	"time"

	"github.com/caarlos0/env/v10"
	"github.com/jackc/pgx/v5/pgconn"
)

// CloudEventsBinary is RELAY_CLOUDEVENTS's one mode: attributes as headers,
// the payload as the body.
const CloudEventsBinary = "binary"

// RELAY_DEAD_LETTER_QUEUE_TYPE values.
const (
	QueueClassic = "classic"
	QueueQuorum  = "quorum"
)

// RELAY_ON_PUBLISHED values.
const (
	OnPublishedMark   = "mark"
	OnPublishedDelete = "delete"
)

// Config is the whole configuration. Every field is documented in the README
// with its default; the env tags are the contract.
type Config struct {
	// DatabaseURL is a normal PostgreSQL URL or keyword/value string; the
	// replication connection is derived from it.
	DatabaseURL string `env:"RELAY_DATABASE_URL"`
	// AMQPURL is the RabbitMQ URL (amqp:// or amqps://).
	AMQPURL string `env:"RELAY_AMQP_URL" envDefault:"amqp://guest:guest@localhost:5672/"`
	// AMQPCAFile, AMQPCertFile and AMQPKeyFile configure TLS for amqps://.
	AMQPCAFile   string `env:"RELAY_AMQP_CA_FILE"`
	AMQPCertFile string `env:"RELAY_AMQP_CERT_FILE"`
	AMQPKeyFile  string `env:"RELAY_AMQP_KEY_FILE"`
	// Slot is the logical replication slot the relay owns.
	Slot string `env:"RELAY_SLOT" envDefault:"outbox_relay"`
	// Publication names the publication the slot streams.
	Publication string `env:"RELAY_PUBLICATION" envDefault:"outbox_relay_pub"`
	// Table is the outbox table, schema-qualified or not.
	Table string `env:"RELAY_TABLE" envDefault:"public.outbox_events"`
	// ColumnsSpec maps the relay's fields to the table's columns: a preset
	// (default, debezium) and/or field=column pairs (decoder.ParseColumns).
	ColumnsSpec string `env:"RELAY_COLUMNS" envDefault:"default"`
	// HeaderColumns are extra columns sent as message headers of the same
	// names, comma-separated; NULL leaves the header out.
	HeaderColumns string `env:"RELAY_HEADER_COLUMNS"`
	// CloudEvents "binary" adds the CloudEvents attributes as headers
	// (binary content mode); empty sends none.
	CloudEvents string `env:"RELAY_CLOUDEVENTS"`
	// CloudEventsSource is the CloudEvents source attribute; empty derives
	// it from the database and the table (CloudEventsSourceFor).
	CloudEventsSource string `env:"RELAY_CLOUDEVENTS_SOURCE"`
	// Exchange is the durable topic exchange events are published to.
	Exchange string `env:"RELAY_EXCHANGE" envDefault:"outbox.events"`
	// RoutingKey is a template over {aggregate_type}, {event_type} and {aggregate_id}.
	RoutingKey string `env:"RELAY_ROUTING_KEY" envDefault:"{aggregate_type}.{event_type}"`
	// DeadLetterExchange receives events the broker can never accept.
	DeadLetterExchange string `env:"RELAY_DEAD_LETTER_EXCHANGE" envDefault:"outbox.events.dead-letter"`
	// DeadLetterQueueType is the type of the dead-letter queue the relay
	// declares (the exchange's name): classic, or quorum for a queue
	// replicated over a cluster's nodes.
	DeadLetterQueueType string `env:"RELAY_DEAD_LETTER_QUEUE_TYPE" envDefault:"classic"`
	// Unroutable says what to do with an event no queue is bound for:
	// dead-letter, retry or drop.
	Unroutable string `env:"RELAY_UNROUTABLE" envDefault:"dead-letter"`
	// MetricsAddr serves /metrics, /healthz and /readyz; empty disables it.
	MetricsAddr string `env:"RELAY_METRICS_ADDR" envDefault:":9740"`
	// PprofAddr, when set, serves net/http/pprof there (keep it on
	// localhost): profiles of a running relay.
	PprofAddr string `env:"RELAY_PPROF_ADDR"`
	LogLevel  string `env:"RELAY_LOG_LEVEL" envDefault:"info"`
	LogFormat string `env:"RELAY_LOG_FORMAT" envDefault:"json"`

	// PublishWindow caps messages published but not yet confirmed.
	PublishWindow int `env:"RELAY_PUBLISH_WINDOW" envDefault:"1000"`
	// MaxInflightBytes caps the event bytes (payload and text fields) read from the stream (or the
	// table) and not yet confirmed by the broker: the window caps events,
	// this caps their bytes. A single larger event still passes, alone.
	MaxInflightBytes int `env:"RELAY_MAX_INFLIGHT_BYTES" envDefault:"67108864"`
	// OnPublished is what the marker does to a row once the broker has
	// confirmed its event: mark (set published_at, the seed's behaviour)
	// or delete (remove the row: about a seventh of the mark's WAL).
	OnPublished string `env:"RELAY_ON_PUBLISHED" envDefault:"mark"`
	// MarkBatchSize caps the ids one UPDATE marks published.
	MarkBatchSize int `env:"RELAY_MARK_BATCH_SIZE" envDefault:"500"`
	// MarkDelay is how long the marker waits to fill a batch: fewer
	// UPDATEs and commit flushes at the cost of a later acknowledgement.
	MarkDelay time.Duration `env:"RELAY_MARK_DELAY" envDefault:"20ms"`
	// StatusInterval is how often the acknowledged LSN is sent to PostgreSQL.
	StatusInterval time.Duration `env:"RELAY_STATUS_INTERVAL" envDefault:"1s"`
	// BackoffMin and BackoffMax bound the reconnect and retry backoff.
	BackoffMin time.Duration `env:"RELAY_BACKOFF_MIN" envDefault:"100ms"`
	BackoffMax time.Duration `env:"RELAY_BACKOFF_MAX" envDefault:"15s"`
	// ShutdownTimeout bounds the drain after SIGTERM.
	ShutdownTimeout time.Duration `env:"RELAY_SHUTDOWN_TIMEOUT" envDefault:"30s"`
	// AMQPHeartbeat is the AMQP heartbeat: a broker that stops answering
	// without closing the connection is detected within about twice this.
	AMQPHeartbeat time.Duration `env:"RELAY_AMQP_HEARTBEAT" envDefault:"10s"`
	// PostgresTimeout bounds every query and the silence tolerated on the
	// replication stream (the relay asks for a reply when it hears nothing).
	PostgresTimeout time.Duration `env:"RELAY_POSTGRES_TIMEOUT" envDefault:"30s"`
	// HeartbeatInterval, when positive, writes a transactional logical
	// message (pg_logical_emit_message) this often, so the slot advances
	// even on a server with no other traffic. Off by default: an idle relay
	// then sends no queries but its synchronous-standby check.
	HeartbeatInterval time.Duration `env:"RELAY_HEARTBEAT_INTERVAL" envDefault:"0s"`
	// SyncPublish says an operator lists the relay in
	// synchronous_standby_names on purpose, so that an application's COMMIT
	// returns only once the broker has confirmed its events. The relay then
	// does not warn about being a synchronous standby, and it always answers
	// the server at once when its acknowledged position moves.
	SyncPublish bool `env:"RELAY_SYNC_PUBLISH" envDefault:"false"`
	// WaitForSyncStandby: with synchronous_standby_names set, a streamed
	// event is published only once the synchronous standbys have its
	// commit, so that a failover cannot leave an event whose row is gone.
	WaitForSyncStandby bool `env:"RELAY_WAIT_FOR_SYNC_STANDBY" envDefault:"true"`
	// FailoverSlot asks for a failover slot (PostgreSQL 17+): created with
	// FAILOVER, or altered to it, so that standbys with
	// sync_replication_slots keep a copy the relay can resume from after a
	// promotion. Before 17 the relay warns once and uses an ordinary slot.
	FailoverSlot bool `env:"RELAY_FAILOVER_SLOT" envDefault:"false"`
	// MaxMessageBytes: bigger payloads are dead-lettered, never published.
	MaxMessageBytes int `env:"RELAY_MAX_MESSAGE_BYTES" envDefault:"16777216"`

	// Retention, when positive, deletes published rows older than this in
	// the background (e.g. 168h), in batches; 0 keeps them forever. The
	// role then needs DELETE on the table (deploy/least-privilege.sql).
	Retention time.Duration `env:"RELAY_RETENTION" envDefault:"0s"`
	// RetentionInterval is how often background retention runs.
	RetentionInterval time.Duration `env:"RELAY_RETENTION_INTERVAL" envDefault:"1h"`
	// StatusPollInterval, when positive, reads the slot's retained WAL and
	// the unpublished rows this often for the metrics of the same names.
	// Off by default: an idle relay then sends no queries but its
	// synchronous-standby check.
	StatusPollInterval time.Duration `env:"RELAY_STATUS_POLL_INTERVAL" envDefault:"0s"`

	// Sink selects the broker: rabbitmq (RELAY_AMQP_*, RELAY_EXCHANGE...)
	// or nats (JetStream, RELAY_NATS_*; see nats.go and docs/sinks.md).
	Sink string `env:"RELAY_SINK" envDefault:"rabbitmq"`
	// NATSURL is the NATS server URL, or a comma-separated list of them.
	NATSURL string `env:"RELAY_NATS_URL" envDefault:"nats://127.0.0.1:4222"`
	// NATSStream is the JetStream stream of the events, created when
	// missing to capture NATSStreamSubjects.
	NATSStream string `env:"RELAY_NATS_STREAM" envDefault:"OUTBOX_EVENTS"`
	// NATSDeadLetterStream captures NATSDeadLetterSubject, created when missing.
	NATSDeadLetterStream  string `env:"RELAY_NATS_DEAD_LETTER_STREAM" envDefault:"OUTBOX_DEAD_LETTER"`
	NATSDeadLetterSubject string `env:"RELAY_NATS_DEAD_LETTER_SUBJECT" envDefault:"outbox_dead_letter.events"`
	// NATSDuplicateWindow is the duplicate window of the streams the relay
	// creates: a replay within it is not stored again.
	NATSDuplicateWindow time.Duration `env:"RELAY_NATS_DUPLICATE_WINDOW" envDefault:"2m"`
}

// slotPattern: PostgreSQL's slot names ([a-z0-9_]{1,63}), less a leading
// digit: the replication protocol's START_REPLICATION (pglogrepl's) takes
// the name unquoted, and its scanner reads "1abc" as a number, so such a
// slot could be created but never streamed.
var slotPattern = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// Load reads the environment and validates the result.
func Load() (*Config, error) {
	c, err := parse()
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// parse reads the environment. env's errors name the Go field; ours name
// the variable.
func parse() (*Config, error) {
	var c Config
	err := env.Parse(&c)
	if err == nil {
		if c.Sink == SinkNATS && os.Getenv("RELAY_ROUTING_KEY") == "" {
			c.RoutingKey = DefaultNATSSubject
		}
		return &c, nil
	}
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return nil, fmt.Errorf("configuration: %w", err)
	}
	var errs []error
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			name := pe.Name
			if f, ok := reflect.TypeOf(c).FieldByName(pe.Name); ok {
				name, _, _ = strings.Cut(f.Tag.Get("env"), ",")
			}
			errs = append(errs, fmt.Errorf("%s: %w", name, pe.Err))
			continue
		}
		errs = append(errs, e)
	}
	return nil, errors.Join(errs...)
}

// LoadForTools reads the environment for subcommands that need only the
// database (migrate, status): the AMQP side is not validated.
func LoadForTools() (*Config, error) {
	c, err := parse()
	if err != nil {
		return nil, err
	}
	if err := c.validateDatabase(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Config) validateDatabase() error {
	var errs []error
	if c.DatabaseURL == "" {
		errs = append(errs, errors.New("RELAY_DATABASE_URL is required (a PostgreSQL URL such as postgres://user@host:5432/db)"))
	} else if _, err := pgconn.ParseConfig(c.DatabaseURL); err != nil {
		// pgconn's parse errors can quote the string; never echo it.
		errs = append(errs, errors.New("RELAY_DATABASE_URL is not a valid PostgreSQL connection string"))
	}
	if !slotPattern.MatchString(c.Slot) {
		errs = append(errs, fmt.Errorf("RELAY_SLOT %q is not a valid slot name (must match %s)", c.Slot, slotPattern))
	}
	if c.Publication == "" {
		errs = append(errs, errors.New("RELAY_PUBLICATION must not be empty"))
	}
	if _, _, err := SplitTable(c.Table); err != nil {
		errs = append(errs, fmt.Errorf("RELAY_TABLE: %w", err))
	}
	if _, err := c.Columns(); err != nil {
		errs = append(errs, err)
	}
	if _, err := ParseLevel(c.LogLevel); err != nil {
		errs = append(errs, err)
	}
	if c.LogFormat != "json" && c.LogFormat != "console" {
		errs = append(errs, fmt.Errorf("RELAY_LOG_FORMAT %q is not one of json, console", c.LogFormat))
	}
	return errors.Join(errs...)
}

// Validate checks every field and reports all problems at once.
func (c *Config) Validate() error {
	errs := []error{c.validateDatabase()}
	switch c.Sink {
	case SinkRabbitMQ, "": // "": a Config built in code, as tests do
		urls := c.AMQPURLs()
		if len(urls) == 0 {
			errs = append(errs, errors.New("RELAY_AMQP_URL must be an amqp:// or amqps:// URL with a host"))
		}
		for i, raw := range urls {
			if u, err := url.Parse(raw); err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") || u.Host == "" {
				if len(urls) == 1 {
					errs = append(errs, errors.New("RELAY_AMQP_URL must be an amqp:// or amqps:// URL with a host"))
				} else {
					// Its position, not its text, which may hold a password.
					errs = append(errs, fmt.Errorf("RELAY_AMQP_URL: node URL %d of %d must be an amqp:// or amqps:// URL with a host", i+1, len(urls)))
				}
			}
		}
		if c.Exchange == "" {
			errs = append(errs, errors.New("RELAY_EXCHANGE must not be empty"))
		}
		if c.DeadLetterExchange == "" {
			errs = append(errs, errors.New("RELAY_DEAD_LETTER_EXCHANGE must not be empty"))
		}
		if c.DeadLetterExchange == c.Exchange {
			errs = append(errs, errors.New("RELAY_DEAD_LETTER_EXCHANGE must differ from RELAY_EXCHANGE"))
		}
		switch c.DeadLetterQueueType {
		case QueueClassic, QueueQuorum, "": // "": a Config built in code
		default:
			errs = append(errs, fmt.Errorf("RELAY_DEAD_LETTER_QUEUE_TYPE %q is not one of %s, %s", c.DeadLetterQueueType, QueueClassic, QueueQuorum))
		}
	case SinkNATS:
		errs = append(errs, c.validateNATS()...)
	default:
		errs = append(errs, fmt.Errorf("RELAY_SINK %q is not one of %s, %s", c.Sink, SinkRabbitMQ, SinkNATS))
	}
	if _, err := ParseRoutingKey(c.RoutingKey); err != nil {
		errs = append(errs, fmt.Errorf("RELAY_ROUTING_KEY: %w", err))
	}
	switch c.Unroutable {
	case "dead-letter", "retry", "drop":
	default:
		errs = append(errs, fmt.Errorf("RELAY_UNROUTABLE %q is not one of dead-letter, retry, drop", c.Unroutable))
	}
	switch c.CloudEvents {
	case "", CloudEventsBinary:
	default:
		errs = append(errs, fmt.Errorf("RELAY_CLOUDEVENTS %q is not one of %s (or empty for none)", c.CloudEvents, CloudEventsBinary))
	}
	switch c.OnPublished {
	case OnPublishedMark, OnPublishedDelete:
	default:
		errs = append(errs, fmt.Errorf("RELAY_ON_PUBLISHED %q is not one of %s, %s", c.OnPublished, OnPublishedMark, OnPublishedDelete))
	}
	positive := func(name string, v int) {
		if v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %d", name, v))
		}
	}
	positive("RELAY_PUBLISH_WINDOW", c.PublishWindow)
	positive("RELAY_MARK_BATCH_SIZE", c.MarkBatchSize)
	positive("RELAY_MAX_INFLIGHT_BYTES", c.MaxInflightBytes)
	positive("RELAY_MAX_MESSAGE_BYTES", c.MaxMessageBytes)
	durations := []struct {
		name string
		v    time.Duration
	}{
		{"RELAY_STATUS_INTERVAL", c.StatusInterval},
		{"RELAY_BACKOFF_MIN", c.BackoffMin},
		{"RELAY_BACKOFF_MAX", c.BackoffMax},
		{"RELAY_SHUTDOWN_TIMEOUT", c.ShutdownTimeout},
		{"RELAY_AMQP_HEARTBEAT", c.AMQPHeartbeat},
		{"RELAY_POSTGRES_TIMEOUT", c.PostgresTimeout},
	}
	for _, d := range durations {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be a positive duration, got %s", d.name, d.v))
		}
	}
	if c.MarkDelay < 0 {
		errs = append(errs, fmt.Errorf("RELAY_MARK_DELAY must not be negative, got %s", c.MarkDelay))
	}
	if c.HeartbeatInterval < 0 {
		errs = append(errs, fmt.Errorf("RELAY_HEARTBEAT_INTERVAL must not be negative, got %s", c.HeartbeatInterval))
	}
	if c.BackoffMax < c.BackoffMin {
		errs = append(errs, errors.New("RELAY_BACKOFF_MAX must not be less than RELAY_BACKOFF_MIN"))
	}
	if c.Retention < 0 {
		errs = append(errs, fmt.Errorf("RELAY_RETENTION must not be negative (0 disables retention), got %s", c.Retention))
	}
	if c.Retention > 0 && c.RetentionInterval <= 0 {
		errs = append(errs, fmt.Errorf("RELAY_RETENTION_INTERVAL must be a positive duration, got %s", c.RetentionInterval))
	}
	if c.StatusPollInterval < 0 {
		errs = append(errs, fmt.Errorf("RELAY_STATUS_POLL_INTERVAL must not be negative (0 disables polling), got %s", c.StatusPollInterval))
	}
	return errors.Join(errs...)
}

// SplitTable splits "schema.table" (schema defaults to public).
func SplitTable(s string) (schema, table string, err error) {
	parts := strings.Split(s, ".")
	switch {
	case len(parts) == 1 && parts[0] != "":
		return "public", parts[0], nil
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		return parts[0], parts[1], nil
	}
	return "", "", fmt.Errorf("%q is not a table name of the form schema.table", s)
}

// AMQPURLs is RELAY_AMQP_URL split at commas: one URL per RabbitMQ node of
// a cluster, or a single URL.
func (c *Config) AMQPURLs() []string { return splitURLList(c.AMQPURL) }

// splitURLList splits a comma-separated list of URLs. A piece without
// "://" belongs to the URL before it, so that a password with a comma
// (legal unescaped in a URL's userinfo) keeps its URL whole.
func splitURLList(raw string) []string {
	var out []string
	for _, p := range strings.Split(raw, ",") {
		if len(out) > 0 && !strings.Contains(p, "://") {
			out[len(out)-1] += "," + p
			continue
		}
		out = append(out, p)
	}
	kept := out[:0]
	for _, u := range out {
		if u = strings.TrimSpace(strings.TrimRight(strings.TrimSpace(u), ",")); u != "" {
			kept = append(kept, u)
		}
	}
	return kept
}

// RedactList is Redact for each URL of a comma-separated list.
func RedactList(raw string) string {
	parts := splitURLList(raw)
	for i, p := range parts {
		parts[i] = Redact(p)
	}
	return strings.Join(parts, ",")
}

// Redact returns a URL with its password replaced, for logs and errors.
// Keyword/value strings have their password= value replaced.
func Redact(raw string) string {
	if u, err := url.Parse(raw); err == nil && u.Scheme != "" && u.Host != "" {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
		q := u.Query()
		if q.Has("password") {
			q.Set("password", "xxxxx")
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return kvPassword.ReplaceAllString(raw, "${1}xxxxx")
}

var kvPassword = regexp.MustCompile(`(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// ReadSecretFiles lets NAME_FILE stand for NAME, for container secrets: when
// NAME is unset and NAME_FILE names a file, NAME is set to its trimmed
// content. It must run before Load.
func ReadSecretFiles(names ...string) error {
	for _, name := range names {
		path := os.Getenv(name + "_FILE")
		if path == "" {
			continue
		}
		if os.Getenv(name) != "" {
			return fmt.Errorf("both %s and %s_FILE are set; set one", name, name)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("%s_FILE: %w", name, err)
		}
		if err := os.Setenv(name, strings.TrimSpace(string(b))); err != nil {
			return fmt.Errorf("%s_FILE: %w", name, err)
		}
	}
	return nil
}
