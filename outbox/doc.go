// Package outbox writes events into the transactional outbox table from a Go
// application, inside the application's own transaction.
//
// An event is committed, or rolled back, together with the business change
// it describes: pass the transaction you already have.
//
//	tx, err := pool.Begin(ctx)
//	...
//	if _, err := tx.Exec(ctx, `UPDATE orders SET status = 'paid' WHERE id = $1`, orderID); err != nil { ... }
//	payload, err := outbox.JSON(OrderPaid{OrderID: orderID, Amount: 4200})
//	...
//	err = outbox.Insert(ctx, tx, outbox.Event{
//		AggregateType: "order",
//		AggregateID:   orderID,
//		EventType:     "paid",
//		Payload:       payload,
//	})
//	...
//	err = tx.Commit(ctx)
//
// outbox-relay then streams the committed rows to the broker. What this
// package guarantees:
//
//   - Insert writes all its events with one statement (one round trip, an
//     INSERT … SELECT over unnest of arrays), in the order given, so the
//     relay publishes them in that order. It writes nothing if any event is
//     invalid.
//   - Ids left empty are UUIDv7 (RFC 9562): they sort by creation time, also
//     within one call, which keeps the primary key index append-mostly.
//     Generate one with NewID when you need it before the insert.
//   - OccurredAt left zero becomes the table's default, now(): the start of
//     the transaction.
//   - Validation errors wrap ErrInvalid and name the event by its index.
//
// Other languages write the same row with plain SQL; see docs/sinks.md.
package outbox
