// Package sink publishes outbox events to a message broker and reports the
// broker's verdict on each one.
//
// The relay depends on the small Publisher interface; RabbitMQ is the
// implementation. Its guarantees, which the relay's acknowledgement rests on:
//
//   - Every message is published on a channel in confirm mode, persistent and
//     with the mandatory flag. A message counts as delivered only when the
//     broker acks it and did not return it: RabbitMQ acks an unroutable
//     mandatory message too, after sending basic.return, so Wait drains the
//     return notifications before it trusts an ack.
//   - Publish does not wait: the caller keeps a bounded window of pending
//     confirmations and calls Wait on them in publish order, from one
//     goroutine. Because the return of a message arrives before its ack on
//     the same connection, draining returns inside Wait is race-free.
//   - A lost connection or channel is an error from Publish or Wait, never a
//     nack: the relay then reconnects and republishes everything that was not
//     confirmed, in order.
//   - Messages the broker can never accept (Reject) are not published; the
//     relay sends them to the dead-letter exchange instead.
package sink
