package sink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// RabbitMQConfig configures the RabbitMQ publisher.
type RabbitMQConfig struct {
	URL                string
	Exchange           string // durable topic exchange, declared if missing
	DeadLetterExchange string // durable fanout exchange with a queue of the same name
	MaxMessageBytes    int
	TLS                *tls.Config   // for amqps://; nil uses the system roots
	Heartbeat          time.Duration // AMQP heartbeat; a silent broker is detected within about twice this
	ConnectionName     string
	OnBlocked          func(blocked bool, reason string) // flow control notifications; may be nil
}

// RabbitMQ publishes with confirms on one channel.
type RabbitMQ struct {
	cfg     RabbitMQConfig
	conn    *amqp.Connection
	wire    *coalescingConn
	ch      *amqp.Channel
	returns chan amqp.Return
	closed  chan *amqp.Error // connection or channel closed

	// returned holds message ids the broker returned whose confirmation has
	// not been waited for yet. Only the Wait goroutine touches it.
	returned map[string]string
	mu       sync.Mutex // serialises Wait's use of returned with DeadLetter
}

// maxShortString is AMQP's limit on a routing key.
const maxShortString = 255

// DialRabbitMQ connects, declares the topology and enables confirms.
func DialRabbitMQ(ctx context.Context, cfg RabbitMQConfig) (*RabbitMQ, error) {
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = 10 * time.Second
	}
	if cfg.ConnectionName == "" {
		cfg.ConnectionName = "outbox-relay"
	}
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName(cfg.ConnectionName)
	conn, wire, err := dial(ctx, cfg, props)
	if err != nil {
		return nil, err
	}
	r := &RabbitMQ{
		cfg:      cfg,
		conn:     conn,
		wire:     wire,
		returns:  make(chan amqp.Return, 1024),
		closed:   make(chan *amqp.Error, 2),
		returned: make(map[string]string),
	}
	if err := r.setup(); err != nil {
		conn.Close()
		return nil, err
	}
	return r, nil
}

func dial(ctx context.Context, cfg RabbitMQConfig, props amqp.Table) (*amqp.Connection, *coalescingConn, error) {
	type result struct {
		conn *amqp.Connection
		wire *coalescingConn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		var wire *coalescingConn
		tcp := amqp.DefaultDial(15 * time.Second)
		c, err := amqp.DialConfig(cfg.URL, amqp.Config{
			Heartbeat:       cfg.Heartbeat,
			Locale:          "en_US",
			Properties:      props,
			TLSClientConfig: cfg.TLS,
			// Below TLS, if any: held writes become one TCP write.
			Dial: func(network, addr string) (net.Conn, error) {
				c, err := tcp(network, addr)
				if err != nil {
					return nil, err
				}
				wire = newCoalescingConn(c)
				return wire, nil
			},
		})
		done <- result{c, wire, err}
	}()
	select {
	case res := <-done:
		if res.err != nil {
			// amqp091's errors do not include the URL, so no password leaks.
			return nil, nil, fmt.Errorf("connect to RabbitMQ: %w", res.err)
		}
		return res.conn, res.wire, nil
	case <-ctx.Done():
		go func() {
			if res := <-done; res.conn != nil {
				res.conn.Close()
			}
		}()
		return nil, nil, ctx.Err()
	}
}

func (r *RabbitMQ) setup() error {
	ch, err := r.conn.Channel()
	if err != nil {
		return fmt.Errorf("open RabbitMQ channel: %w", err)
	}
	r.ch = ch
	if err := ch.ExchangeDeclare(r.cfg.Exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %q (durable topic): %w", r.cfg.Exchange, err)
	}
	// Declarations that fail close the channel, so each gets a fresh one.
	if ch, err = r.conn.Channel(); err != nil {
		return fmt.Errorf("open RabbitMQ channel: %w", err)
	}
	r.ch = ch
	dlx := r.cfg.DeadLetterExchange
	if err := ch.ExchangeDeclare(dlx, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare dead-letter exchange %q (durable fanout): %w", dlx, err)
	}
	if _, err := ch.QueueDeclare(dlx, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare dead-letter queue %q: %w", dlx, err)
	}
	if err := ch.QueueBind(dlx, "", dlx, false, nil); err != nil {
		return fmt.Errorf("bind dead-letter queue %q: %w", dlx, err)
	}
	if err := ch.Confirm(false); err != nil {
		return fmt.Errorf("enable publisher confirms: %w", err)
	}
	ch.NotifyReturn(r.returns)
	r.conn.NotifyClose(forward(r.closed))
	ch.NotifyClose(forward(r.closed))
	if r.cfg.OnBlocked != nil {
		blocked := r.conn.NotifyBlocked(make(chan amqp.Blocking, 4))
		go func() {
			for b := range blocked {
				r.cfg.OnBlocked(b.Active, b.Reason)
			}
		}()
	}
	return nil
}

// forward returns a notify channel whose first close error reaches dst
// without ever blocking amqp091's shutdown.
func forward(dst chan *amqp.Error) chan *amqp.Error {
	src := make(chan *amqp.Error, 1)
	go func() {
		if e, ok := <-src; ok {
			select {
			case dst <- e:
			default:
			}
		} else {
			select {
			case dst <- nil:
			default:
			}
		}
	}()
	return src
}

// ErrClosed reports a connection or channel that went away.
var ErrClosed = errors.New("RabbitMQ connection or channel closed")

func (r *RabbitMQ) closedErr() error {
	select {
	case e := <-r.closed:
		// Put it back so every later caller sees it too.
		select {
		case r.closed <- e:
		default:
		}
		if e != nil {
			return fmt.Errorf("%w: %w", ErrClosed, e)
		}
	default:
	}
	return ErrClosed
}

// Reject implements Publisher.
func (r *RabbitMQ) Reject(m *Message) string {
	if len(m.Key) > maxShortString {
		return fmt.Sprintf("routing key is %d bytes; AMQP allows at most %d", len(m.Key), maxShortString)
	}
	if r.cfg.MaxMessageBytes > 0 && len(m.Body) > r.cfg.MaxMessageBytes {
		return fmt.Sprintf("payload is %d bytes; RELAY_MAX_MESSAGE_BYTES is %d", len(m.Body), r.cfg.MaxMessageBytes)
	}
	return ""
}

func publishing(m *Message) amqp.Publishing {
	return amqp.Publishing{
		Headers: amqp.Table{
			"aggregate_type": m.AggregateType,
			"aggregate_id":   m.AggregateID,
			"occurred_at":    m.OccurredAt.UTC().Format(time.RFC3339Nano),
		},
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		MessageId:    m.ID,
		Timestamp:    m.OccurredAt,
		Type:         m.Type,
		AppId:        "outbox-relay",
		Body:         m.Body,
	}
}

type rabbitPending struct {
	r  *RabbitMQ
	dc *amqp.DeferredConfirmation
	id string
}

// Publish implements Publisher.
func (r *RabbitMQ) Publish(ctx context.Context, m *Message) (Pending, error) {
	dc, err := r.ch.PublishWithDeferredConfirmWithContext(ctx, r.cfg.Exchange, m.Key, true, false, publishing(m))
	if err != nil {
		if r.ch.IsClosed() || r.conn.IsClosed() {
			return nil, fmt.Errorf("publish %s: %w", m.ID, r.closedErr())
		}
		return nil, fmt.Errorf("publish %s: %w", m.ID, err)
	}
	return &rabbitPending{r: r, dc: dc, id: m.ID}, nil
}

// Wait implements Pending. Waits must come in publish order from one
// goroutine at a time.
func (p *rabbitPending) Wait(ctx context.Context) (Result, error) {
	r := p.r
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		select {
		case ret, ok := <-r.returns:
			r.record(ret, ok)
		case <-p.dc.Done():
			// A return precedes its ack on the wire and amqp091 hands it to
			// the buffered returns channel before it processes the ack, so
			// it is in the buffer now if it exists.
			r.drainReturns()
			if reason, ok := r.returned[p.id]; ok {
				delete(r.returned, p.id)
				return Result{Outcome: Returned, Reason: reason}, nil
			}
			if p.dc.Acked() {
				return Result{Outcome: Acked}, nil
			}
			if r.ch.IsClosed() || r.conn.IsClosed() {
				return Result{}, fmt.Errorf("confirm of %s: %w", p.id, r.closedErr())
			}
			return Result{Outcome: Nacked, Reason: "basic.nack from broker"}, nil
		case <-ctx.Done():
			return Result{}, ctx.Err()
		}
	}
}

func (r *RabbitMQ) drainReturns() {
	for r.returns != nil {
		select {
		case ret, ok := <-r.returns:
			r.record(ret, ok)
		default:
			return
		}
	}
}

// record remembers a returned message until its confirmation is waited for.
func (r *RabbitMQ) record(ret amqp.Return, ok bool) {
	if !ok {
		// amqp091 closes notify channels on shutdown; a nil channel keeps
		// the selects from spinning on it.
		r.returns = nil
		return
	}
	r.returned[ret.MessageId] = fmt.Sprintf("%d %s", ret.ReplyCode, ret.ReplyText)
}

// DeadLetter implements Publisher. Call it only from the goroutine that calls
// Wait, between Waits.
func (r *RabbitMQ) DeadLetter(ctx context.Context, m *Message, reason string) error {
	pub := publishing(m)
	pub.Headers["x-outbox-reason"] = reason
	pub.Headers["x-outbox-exchange"] = r.cfg.Exchange
	if len(m.Key) <= maxShortString {
		pub.Headers["x-outbox-routing-key"] = m.Key
	}
	if r.cfg.MaxMessageBytes > 0 && len(pub.Body) > r.cfg.MaxMessageBytes {
		// The broker would refuse the body too: dead-letter the facts only.
		pub.Body = nil
		pub.Headers["x-outbox-payload-omitted"] = true
	}
	dc, err := r.ch.PublishWithDeferredConfirmWithContext(ctx, r.cfg.DeadLetterExchange, "", true, false, pub)
	if err != nil {
		return fmt.Errorf("dead-letter %s: %w", m.ID, err)
	}
	res, err := (&rabbitPending{r: r, dc: dc, id: m.ID}).Wait(ctx)
	if err != nil {
		return fmt.Errorf("dead-letter %s: %w", m.ID, err)
	}
	if res.Outcome != Acked {
		return fmt.Errorf("dead-letter %s to %q: %s (%s)", m.ID, r.cfg.DeadLetterExchange, res.Outcome, res.Reason)
	}
	return nil
}

// Hold implements Batcher: publishes are buffered until Flush.
func (r *RabbitMQ) Hold() { r.wire.Hold() }

// Flush implements Batcher.
func (r *RabbitMQ) Flush() error {
	if err := r.wire.Flush(); err != nil {
		if r.ch.IsClosed() || r.conn.IsClosed() {
			return fmt.Errorf("write to RabbitMQ: %w", r.closedErr())
		}
		return fmt.Errorf("write to RabbitMQ: %w", err)
	}
	return nil
}

// Close implements Publisher.
func (r *RabbitMQ) Close() error {
	// The close handshake must not sit in a held buffer.
	_ = r.wire.Flush()
	if r.ch != nil {
		_ = r.ch.Close()
	}
	return r.conn.Close()
}
