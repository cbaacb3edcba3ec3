// Command demo shows outbox-relay end to end: `produce` writes events into
// the outbox table the way an application would (in its own transactions),
// and `consume` prints what arrives on the exchange. scripts/demo.sh runs
// both around the relay.
//
//	demo produce [-rate 5] [-n N] [-duration D]   # RELAY_DATABASE_URL, RELAY_TABLE
//	demo consume [-n N] [-duration D]             # RELAY_AMQP_URL, RELAY_EXCHANGE
//
// Both stop cleanly on SIGINT or SIGTERM, after N events/messages, or after
// the duration, whichever comes first.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/outbox"
	amqp "github.com/rabbitmq/amqp091-go"
)

const usage = `usage: demo produce|consume [flags]

  produce   insert outbox events continuously (RELAY_DATABASE_URL, RELAY_TABLE)
  consume   print the messages the relay publishes (RELAY_AMQP_URL, RELAY_EXCHANGE)

Flags (both): -n N stops after N events/messages, -duration D after D.
produce also takes -rate (events per second, default 5).
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var err error
	switch os.Args[1] {
	case "produce":
		err = produce(ctx, os.Args[2:], os.Stdout)
	case "consume":
		err = consume(ctx, os.Args[2:], os.Stdout)
	case "-h", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "demo: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// bounds are the flags both subcommands share.
type bounds struct {
	n        int
	duration time.Duration
}

func (b *bounds) register(fs *flag.FlagSet, what string) {
	fs.IntVar(&b.n, "n", 0, "stop after this many "+what+" (0: no limit)")
	fs.DurationVar(&b.duration, "duration", 0, "stop after this long (0: no limit)")
}

// context returns ctx bounded by -duration.
func (b *bounds) context(ctx context.Context) (context.Context, context.CancelFunc) {
	if b.duration > 0 {
		return context.WithTimeout(ctx, b.duration)
	}
	return context.WithCancel(ctx)
}

func getenv(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// --- produce -----------------------------------------------------------------

type event struct {
	id            string
	aggregateType string
	aggregateID   string
	eventType     string
	payload       []byte
}

var (
	aggregateTypes = []string{"order", "customer", "payment"}
	eventTypes     = []string{"created", "updated", "paid"}
	customers      = []string{"Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret"}
)

func produce(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("produce", flag.ContinueOnError)
	var b bounds
	b.register(fs, "events")
	rate := fs.Float64("rate", 5, "events per second")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *rate <= 0 {
		return errors.New("-rate must be positive")
	}
	dbURL := os.Getenv("RELAY_DATABASE_URL")
	if dbURL == "" {
		return errors.New("RELAY_DATABASE_URL is required")
	}
	// The producer package writes events inside the caller's transaction.
	writer, err := outbox.New(getenv("RELAY_TABLE", outbox.DefaultTable))
	if err != nil {
		return err
	}
	ctx, cancel := b.context(ctx)
	defer cancel()

	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	defer conn.Close(context.Background())

	interval := time.Duration(float64(time.Second) / *rate)
	total, txs := 0, 0
	next := time.Now()
	for b.n == 0 || total < b.n {
		// One transaction in four carries several events about one aggregate,
		// as a business change often does; they arrive in insert order.
		size := 1
		if mrand.IntN(4) == 0 {
			size = 2 + mrand.IntN(3)
		}
		if b.n > 0 && total+size > b.n {
			size = b.n - total
		}
		evs := makeEvents(size)

		// Pace by events, not transactions, so -rate holds on average.
		next = next.Add(time.Duration(size) * interval)
		if !sleepUntil(ctx, next) {
			break
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			batch := make([]outbox.Event, len(evs))
			for i, e := range evs {
				batch[i] = outbox.Event{ID: e.id, AggregateType: e.aggregateType, AggregateID: e.aggregateID,
					EventType: e.eventType, Payload: e.payload, OccurredAt: time.Now()}
			}
			return writer.Insert(ctx, tx, batch...)
		})
		if err != nil {
			if ctx.Err() != nil {
				break // interrupted mid-transaction: rolled back, never published
			}
			return fmt.Errorf("insert: %w", err)
		}
		total += size
		txs++
		parts := make([]string, len(evs))
		for i, e := range evs {
			parts[i] = fmt.Sprintf("%s.%s %s", e.aggregateType, e.eventType, e.id)
		}
		fmt.Fprintf(out, "%s committed tx #%d (%d event(s)): %s\n",
			time.Now().Format("15:04:05.000"), txs, size, strings.Join(parts, ", "))
	}
	fmt.Fprintf(out, "%s stopped after %d event(s) in %d transaction(s)\n",
		time.Now().Format("15:04:05.000"), total, txs)
	return nil
}

func makeEvents(n int) []event {
	aggType := aggregateTypes[mrand.IntN(len(aggregateTypes))]
	aggID := outbox.NewID()
	evs := make([]event, n)
	for i := range evs {
		// A multi-event transaction creates its aggregate, then changes it.
		evType := eventTypes[mrand.IntN(len(eventTypes))]
		switch {
		case n > 1 && i == 0:
			evType = "created"
		case n > 1:
			evType = eventTypes[1+mrand.IntN(len(eventTypes)-1)]
		}
		payload, _ := json.Marshal(map[string]any{
			"customer": customers[mrand.IntN(len(customers))],
			"amount":   float64(mrand.IntN(100000)) / 100,
			"currency": "EUR",
			"seq":      i + 1,
		})
		evs[i] = event{id: outbox.NewID(), aggregateType: aggType, aggregateID: aggID, eventType: evType, payload: payload}
	}
	return evs
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// --- consume -----------------------------------------------------------------

func consume(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("consume", flag.ContinueOnError)
	var b bounds
	b.register(fs, "messages")
	if err := fs.Parse(args); err != nil {
		return err
	}
	amqpURL := getenv("RELAY_AMQP_URL", "amqp://guest:guest@localhost:5672/")
	exchange := getenv("RELAY_EXCHANGE", "outbox.events")
	ctx, cancel := b.context(ctx)
	defer cancel()

	conn, err := amqp.DialConfig(amqpURL, amqp.Config{
		Properties: amqp.Table{"connection_name": "outbox-relay demo consumer"},
	})
	if err != nil {
		return fmt.Errorf("connect to RabbitMQ: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	// Declared exactly as the relay declares it, so either may start first.
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %q: %w", exchange, err)
	}
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return fmt.Errorf("declare queue: %w", err)
	}
	if err := ch.QueueBind(q.Name, "#", exchange, false, nil); err != nil {
		return fmt.Errorf("bind queue %s to %q: %w", q.Name, exchange, err)
	}
	deliveries, err := ch.ConsumeWithContext(ctx, q.Name, "", true, true, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	fmt.Fprintf(out, "%s queue %s bound to exchange %q with \"#\"; waiting for messages\n",
		time.Now().Format("15:04:05.000"), q.Name, exchange)

	count := 0
	for b.n == 0 || count < b.n {
		select {
		case <-ctx.Done():
			fmt.Fprintf(out, "%s stopped after %d message(s)\n", time.Now().Format("15:04:05.000"), count)
			return nil
		case e := <-closed:
			return fmt.Errorf("connection closed: %v", e)
		case d, ok := <-deliveries:
			if !ok {
				if ctx.Err() != nil {
					continue
				}
				return errors.New("the broker ended the consumer")
			}
			count++
			printDelivery(out, count, d, time.Now())
		}
	}
	fmt.Fprintf(out, "%s stopped after %d message(s)\n", time.Now().Format("15:04:05.000"), count)
	return nil
}

func printDelivery(out io.Writer, n int, d amqp.Delivery, now time.Time) {
	latency := "?"
	if s, ok := d.Headers["occurred_at"].(string); ok {
		if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
			latency = now.Sub(t).Round(100 * time.Microsecond).String()
		}
	}
	keys := make([]string, 0, len(d.Headers))
	for k := range d.Headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	hdrs := make([]string, len(keys))
	for i, k := range keys {
		hdrs[i] = fmt.Sprintf("%s=%v", k, d.Headers[k])
	}
	fmt.Fprintf(out, "%s #%d %s message_id=%s type=%s latency=%s headers={%s} body=%s\n",
		now.Format("15:04:05.000"), n, d.RoutingKey, d.MessageId, d.Type, latency,
		strings.Join(hdrs, " "), d.Body)
}
