// Package metrics defines the relay's Prometheus metrics (the names are part
// of the contract in DESIGN.md) and serves /metrics, /healthz and /readyz.
package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds every collector the relay updates.
type Metrics struct {
	Registry *prometheus.Registry

	EventsPublished prometheus.Counter
	EventsSkipped   prometheus.Counter
	// RowsDeletedBeforeMark counts published events whose rows were gone
	// before the mark (the application deleted them).
	RowsDeletedBeforeMark prometheus.Counter
	DeadLettered          *prometheus.CounterVec // by reason class
	ReplicationLag        prometheus.Gauge
	AckedLSN              prometheus.Gauge
	ReceivedLSN           prometheus.Gauge
	ServerWALEnd          prometheus.Gauge
	ConfirmSeconds        prometheus.Histogram
	StandbyWaitSeconds    prometheus.Histogram
	DeliverySeconds       prometheus.Histogram
	MarkSeconds           prometheus.Histogram
	StreamDelay           prometheus.Histogram
	Reconnects            *prometheus.CounterVec // by dependency
	Retries               *prometheus.CounterVec // by dependency and kind
	Standby               prometheus.Gauge
	SweptEvents           prometheus.Counter
	SlotWALRetained       prometheus.Gauge
	SlotSafeWAL           prometheus.Gauge
	Unpublished           prometheus.Gauge
	OldestUnpublishd      prometheus.Gauge
	// SyncStandby is 1 while the relay's walsender is a synchronous standby
	// candidate, labelled with its pg_stat_replication sync_state and
	// whether RELAY_SYNC_PUBLISH asks for it.
	SyncStandby    *prometheus.GaugeVec
	EventsRecorded prometheus.Counter

	BrokerBlocked prometheus.Gauge // 1 while RabbitMQ blocks the relay's publishes
	// AMQPNode is 1 for the RabbitMQ node (host:port) the relay is
	// connected to, 0 for the other nodes of RELAY_AMQP_URL.
	AMQPNode *prometheus.GaugeVec
	// AMQPConnections counts connections made, by node (host:port).
	AMQPConnections *prometheus.CounterVec

	mu     sync.Mutex
	ready  string // "" when ready, otherwise why not
	notice string // shown by /readyz whether ready or not
	// failover is the failover slot's row (status.Failover.Summary),
	// shown by /readyz whether ready or not; "" shows none.
	failover string
	// While RabbitMQ blocks publishers (connection.blocked), blockedWhy
	// is its reason and blockedSince the start of the episode.
	blocked      bool
	blockedWhy   string
	blockedSince time.Time
	blockedTotal time.Duration // of the episodes that ended
	// open counts the connections open to each RabbitMQ node: one at a
	// time, but the close of the last may be told after the next opened.
	open map[string]int
}

// New registers the relay's metrics and the Go runtime collectors.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &Metrics{Registry: reg, ready: "starting", open: map[string]int{}}
	m.EventsPublished = prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_events_published_total",
		Help: "Events confirmed by the broker and marked published."})
	m.EventsSkipped = prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_events_skipped_total",
		Help: "Replayed events not published again because their row was already marked."})
	m.RowsDeletedBeforeMark = prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_rows_deleted_before_mark_total",
		Help: "Published events whose rows the application had deleted before the relay could mark them."})
	m.DeadLettered = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_events_dead_lettered_total",
		Help: "Events sent to the dead-letter exchange, by reason."}, []string{"reason"})
	m.ReplicationLag = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_replication_lag_bytes",
		Help: "Server WAL end minus the acknowledged LSN."})
	m.AckedLSN = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_acknowledged_lsn",
		Help: "The LSN last acknowledged to PostgreSQL as flushed."})
	m.ReceivedLSN = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_received_lsn",
		Help: "The newest WAL position received from the slot."})
	m.ServerWALEnd = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_server_wal_end_lsn",
		Help: "The server's WAL end as last reported on the stream."})
	m.ConfirmSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_publish_confirm_seconds",
		Help: "Time from publish to the broker's confirm.", Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 14)})
	m.StandbyWaitSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_sync_standby_wait_seconds",
		Help:    "Time a batch of streamed events waited for the synchronous standbys to confirm their commits before it was published (RELAY_WAIT_FOR_SYNC_STANDBY).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 14)})
	m.DeliverySeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_event_delivery_seconds",
		Help: "Time from occurred_at to the broker's confirm.", Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 16)})
	m.MarkSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_mark_seconds",
		Help: "Duration of one mark UPDATE.", Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12)})
	m.StreamDelay = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_stream_delay_seconds",
		Help:    "Time from a transaction's commit (its commit timestamp, by the database server's clock) to the relay receiving its first event on the replication stream.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18)})
	m.Reconnects = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_reconnects_total",
		Help: "Sessions restarted after a failure, by the dependency that failed."}, []string{"dependency"})
	m.Retries = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_retries_total",
		Help: "Operations retried, by dependency and kind."}, []string{"dependency", "kind"})
	m.Standby = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_standby",
		Help: "1 while this instance waits because another relay holds the slot."})
	m.SweptEvents = prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_swept_events_total",
		Help: "Unpublished rows found in the table (not in the stream) and published."})
	m.SlotWALRetained = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_slot_wal_retained_bytes",
		Help: "WAL the slot holds back (current WAL LSN minus the slot's restart_lsn)."})
	m.SlotSafeWAL = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_slot_safe_wal_bytes",
		Help: "WAL that can still be written before the slot is lost to max_slot_wal_keep_size (pg_replication_slots.safe_wal_size); -1 when no limit is set."})
	m.Unpublished = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_unpublished_rows",
		Help: "Rows with published_at IS NULL."})
	m.OldestUnpublishd = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_oldest_unpublished_age_seconds",
		Help: "Age of the oldest unpublished row."})
	m.BrokerBlocked = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_broker_blocked",
		Help: "1 while RabbitMQ blocks the relay's publishes (connection.blocked: a memory or disk alarm)."})
	blockedSeconds := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_broker_blocked_seconds_total",
		Help: "Time RabbitMQ has blocked the relay's publishes (connection.blocked), the current episode included."},
		m.blockedSeconds)
	m.SyncStandby = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "outbox_relay_sync_standby",
		Help: "1 while the relay's walsender is a synchronous standby candidate (sync_state sync, quorum or potential, " +
			"or unknown while synchronous_standby_names names it), 0 otherwise; sync_state is the state, " +
			"sync_publish whether RELAY_SYNC_PUBLISH asks for it."}, []string{"sync_state", "sync_publish"})
	m.EventsRecorded = prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_events_recorded_total",
		Help: "Confirmed events recorded in outbox_relay_confirmed because their rows were not yet visible to mark " +
			"(their commit waited, e.g. for a synchronous standby)."})
	m.AMQPNode = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "outbox_relay_amqp_node",
		Help: "1 for the RabbitMQ node (host:port) the relay is connected to, 0 for the other nodes of RELAY_AMQP_URL."}, []string{"node"})
	m.AMQPConnections = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_amqp_connections_total",
		Help: "Connections made to each RabbitMQ node (host:port), topology declared."}, []string{"node"})
	for _, c := range []prometheus.Collector{m.AMQPNode, m.AMQPConnections, m.BrokerBlocked, blockedSeconds, m.SyncStandby, m.EventsRecorded, m.EventsPublished, m.EventsSkipped, m.RowsDeletedBeforeMark, m.DeadLettered, m.ReplicationLag,
		m.AckedLSN, m.ReceivedLSN, m.ServerWALEnd, m.ConfirmSeconds, m.StandbyWaitSeconds, m.DeliverySeconds, m.MarkSeconds, m.StreamDelay, m.Reconnects,
		m.Retries, m.Standby, m.SweptEvents, m.SlotWALRetained, m.SlotSafeWAL, m.Unpublished, m.OldestUnpublishd} {
		f(c)
	}
	return m
}

// AMQPNodes sets the RabbitMQ nodes the relay may connect to (host:port,
// never a URL: no credentials in labels), each at 0 until it connects.
func (m *Metrics) AMQPNodes(nodes []string) {
	for _, n := range nodes {
		m.AMQPNode.WithLabelValues(n).Set(0)
		m.AMQPConnections.WithLabelValues(n)
	}
}

// AMQPConnection records a connection to node (host:port) that opened
// (up) or closed.
func (m *Metrics) AMQPConnection(node string, up bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if up {
		m.open[node]++
		m.AMQPConnections.WithLabelValues(node).Inc()
	} else if m.open[node] > 0 {
		m.open[node]--
	}
	v := 0.0
	if m.open[node] > 0 {
		v = 1
	}
	m.AMQPNode.WithLabelValues(node).Set(v)
}

// SetReady records whether the relay is streaming; why is shown by /readyz.
func (m *Metrics) SetReady(ready bool, why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ready {
		m.ready = ""
	} else {
		m.ready = why
	}
}

// SetSyncStandby records the relay's synchronous standby state.
func (m *Metrics) SetSyncStandby(state string, candidate, syncPublish bool) {
	m.SyncStandby.Reset()
	v := 0.0
	if candidate {
		v = 1
	}
	m.SyncStandby.WithLabelValues(state, strconv.FormatBool(syncPublish)).Set(v)
}

// SetNotice sets a line /readyz shows besides readiness ("" clears it):
// something an operator should know that does not make the relay unready.
func (m *Metrics) SetNotice(notice string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.notice = notice
}

// SetFailoverSlot sets the failover slot's state that /readyz shows as
// "failover slot: …" (RELAY_FAILOVER_SLOT). Informational: an unsynced
// copy on the standby does not make the relay unready.
func (m *Metrics) SetFailoverSlot(summary string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failover = summary
}

func (m *Metrics) failoverSlot() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.failover
}

// Notice returns the line set by SetNotice.
func (m *Metrics) Notice() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.notice
}

// SetBrokerBlocked records RabbitMQ's connection.blocked (blocked, with
// its reason) and connection.unblocked. It reports whether the state
// changed, so that the caller logs each episode once: every connection
// is told on its own.
func (m *Metrics) SetBrokerBlocked(blocked bool, reason string) (changed bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if blocked == m.blocked {
		if blocked {
			m.blockedWhy = reason
		}
		return false
	}
	now := time.Now()
	if blocked {
		m.blockedSince, m.blockedWhy = now, reason
		m.BrokerBlocked.Set(1)
	} else {
		m.blockedTotal += now.Sub(m.blockedSince)
		m.blockedWhy = ""
		m.BrokerBlocked.Set(0)
	}
	m.blocked = blocked
	return true
}

func (m *Metrics) blockedSeconds() float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	total := m.blockedTotal
	if m.blocked {
		total += time.Since(m.blockedSince)
	}
	return total.Seconds()
}

// Ready returns "" when ready, else the reason. While RabbitMQ blocks
// publishers the relay is not ready either, whatever SetReady said: it
// streams, but nothing moves.
func (m *Metrics) Ready() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.blocked {
		return m.ready
	}
	why := "blocked by RabbitMQ: " + m.blockedWhy
	if m.ready != "" {
		return m.ready + "; " + why
	}
	return why
}

// Handler serves /metrics, /healthz and /readyz.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		body := "streaming\n"
		why := m.Ready()
		if why != "" {
			body = why + "\n"
		}
		if n := m.Notice(); n != "" {
			body += n + "\n"
		}
		if f := m.failoverSlot(); f != "" {
			body += "failover slot: " + f + "\n"
		}
		if why != "" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_, _ = w.Write([]byte(body))
	})
	return mux
}

// Serve listens on addr until ctx ends.
func (m *Metrics) Serve(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: m.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
