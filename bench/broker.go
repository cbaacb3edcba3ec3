package main

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// brokerResult is one run of the broker's single-client limit.
type brokerResult struct {
	Seconds        float64 `json:"seconds"`
	PublishSeconds float64 `json:"publish_seconds"` // until the last publish (and, with confirms, its confirm)
	Rate           float64 `json:"events_per_s"`
}

// brokerLimit publishes n messages shaped exactly like the relay's (same
// exchange, routing key, properties, headers and body size) from one client
// on one channel, and times until the consumer has all of them. window > 0
// uses confirm mode with that many outstanding confirms; 0 publishes
// without confirms. No database is involved.
func brokerLimit(ctx context.Context, url, exchange, key string, c *consumer, t *tracker, tag uint32, phase, n, window, padLen int, stall time.Duration, progress func(string)) (brokerResult, error) {
	conn, err := amqp.DialConfig(url, amqp.Config{Properties: amqp.Table{"connection_name": "outbox-relay-bench broker-limit"}})
	if err != nil {
		return brokerResult{}, fmt.Errorf("broker limit: connect: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return brokerResult{}, fmt.Errorf("broker limit: channel: %w", err)
	}
	returns := ch.NotifyReturn(make(chan amqp.Return, 1024))
	var returned atomic.Int64
	go func() {
		for range returns {
			returned.Add(1)
		}
	}()
	if window > 0 {
		if err := ch.Confirm(false); err != nil {
			return brokerResult{}, fmt.Errorf("broker limit: confirm mode: %w", err)
		}
	}
	pad := strings.Repeat("x", padLen)
	occurred := time.Now()
	// A circular buffer of the outstanding confirms, oldest at head.
	ring := make([]*amqp.DeferredConfirmation, max(window, 1))
	head, size := 0, 0
	nacks := 0
	wait := func(dc *amqp.DeferredConfirmation) error {
		ok, err := dc.WaitContext(ctx)
		if err != nil {
			return err
		}
		if !ok {
			nacks++
		}
		return nil
	}
	next := time.Now().Add(2 * time.Second)
	start := nowNs()
	for i := 0; i < n; i++ {
		seq := int64(i)
		msg := amqp.Publishing{
			Headers: amqp.Table{
				"aggregate_type": "bench",
				"aggregate_id":   fmt.Sprintf("%08x-0000-4000-8000-%012x", tag, 0),
				"occurred_at":    occurred.UTC().Format(time.RFC3339Nano),
			},
			ContentType:  "application/json",
			DeliveryMode: amqp.Persistent,
			MessageId:    eventID(tag, phase, seq),
			Timestamp:    occurred,
			Type:         "Created",
			AppId:        "outbox-relay",
			Body:         []byte(payloadJSON(pad, seq)),
		}
		t.commit[seq] = nowNs()
		if window > 0 {
			if size == window {
				if err := wait(ring[head]); err != nil {
					return brokerResult{}, fmt.Errorf("broker limit: confirm: %w", err)
				}
				ring[head] = nil
				head = (head + 1) % window
				size--
			}
			dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, true, false, msg)
			if err != nil {
				return brokerResult{}, fmt.Errorf("broker limit: publish: %w", err)
			}
			ring[(head+size)%window] = dc
			size++
		} else {
			if err := ch.PublishWithContext(ctx, exchange, key, true, false, msg); err != nil {
				return brokerResult{}, fmt.Errorf("broker limit: publish: %w", err)
			}
		}
		if progress != nil && i%1000 == 0 && time.Now().After(next) {
			progress(fmt.Sprintf("published %d/%d, received %d", i, n, t.distinct.Load()))
			next = time.Now().Add(2 * time.Second)
		}
	}
	for ; size > 0; size-- {
		dc := ring[head]
		head = (head + 1) % window
		if err := wait(dc); err != nil {
			return brokerResult{}, fmt.Errorf("broker limit: confirm: %w", err)
		}
	}
	published := nowNs()
	if nacks > 0 {
		return brokerResult{}, fmt.Errorf("broker limit: %d messages nacked", nacks)
	}
	if err := c.waitAll(ctx, t, int64(n), stall, func(got int64) {
		if progress != nil {
			progress(fmt.Sprintf("published %d/%d, received %d", n, n, got))
		}
	}); err != nil {
		return brokerResult{}, fmt.Errorf("broker limit: %w (returned %d)", err, returned.Load())
	}
	end := nowNs()
	for _, r := range t.recv {
		if r > end {
			end = r
		}
	}
	res := brokerResult{
		Seconds:        time.Duration(end - start).Seconds(),
		PublishSeconds: time.Duration(published - start).Seconds(),
	}
	res.Rate = float64(n) / res.Seconds
	return res, nil
}
