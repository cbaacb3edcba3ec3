package outbox_test

import (
	"context"
	"log"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/outbox"
)

type OrderPaid struct {
	OrderID string `json:"order_id"`
	Cents   int64  `json:"cents"`
}

// Write an event in the same transaction as the change it describes.
// (No Output comment: it needs a database, so `go test` compiles it but
// does not run it; outbox_test.go runs the same calls against one.)
func ExampleInsert() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	orderID := "0b9a4c9e-3f6e-4e0f-9d55-0c2b1f1e2a7d"
	tx, err := pool.Begin(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback(ctx) // a no-op after Commit

	if _, err := tx.Exec(ctx, `UPDATE orders SET status = 'paid' WHERE id = $1`, orderID); err != nil {
		log.Fatal(err)
	}
	payload, err := outbox.JSON(OrderPaid{OrderID: orderID, Cents: 4200})
	if err != nil {
		log.Fatal(err)
	}
	err = outbox.Insert(ctx, tx, outbox.Event{
		AggregateType: "order",
		AggregateID:   orderID,
		EventType:     "paid",
		Payload:       payload,
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		log.Fatal(err)
	}
}

// A Writer targets another table, here one in schema "billing".
func ExampleNew() {
	w, err := outbox.New("billing.outbox_events")
	if err != nil {
		log.Fatal(err)
	}
	_ = w // w.Insert(ctx, tx, events...)
}
