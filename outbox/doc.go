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
//   - The trace context of the span in ctx (OpenTelemetry's API and its W3C
//     TraceContext propagator; this package needs no SDK) is stored in the
//     traceparent and tracestate columns, which the relay sends as headers
//     of those names: consumers continue the producer's trace. Without a
//     valid span context the statement leaves the columns out and they stay
//     NULL, so inserts without tracing work on a table that has not had
//     migration 006 (`outbox-relay migrate`) yet. With a span on such a
//     table, Insert fails and its error wraps ErrNoTraceColumns, which says
//     to run the migration: deploy the migration before (or with) the
//     upgrade, or write with New(table, WithoutTraceContext()) until then.
//
// Other languages write the same row with plain SQL; see docs/sinks.md.
package outbox
