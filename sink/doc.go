// Package sink publishes outbox events to a message broker and reports the
// broker's verdict on each one.
//
// The relay depends on the small Publisher interface; RabbitMQ (the
// default) and NATS JetStream implement it. RabbitMQ's guarantees, which the
// relay's acknowledgement rests on:
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
//     relay sends them to the dead-letter exchange instead. Reject catches
//     everything that would otherwise end the connection rather than come
//     back as a nack: a routing key, type or message_id over 255 bytes
//     (amqp091 cannot encode the shortstr and shuts the connection down)
//     and a content header over frame_max (RabbitMQ closes the connection).
//   - The dead-letter copy can never be refused for anything in the message
//     (invariant 8): a type or message_id too long for a shortstr moves to
//     a header, header values are cut until the content header fits
//     frame_max, and a payload over the limit is left out; headers
//     (x-outbox-moved, x-outbox-cut, x-outbox-payload-omitted) say so.
//     Header columns, trace headers and CloudEvents attributes count
//     towards frame_max exactly (messageHeaderFrameSize); when they do not
//     fit even cut, the copy leaves out every header column and trace
//     header (x-outbox-dropped).
//   - A broker that blocks publishers (connection.blocked, a resource
//     alarm) stops reading the socket, and amqp091 then blocks in its write
//     whatever the context says. When the context of Publish, DeadLetter or
//     Flush ends mid-call, the socket gets a past write deadline, which
//     fails the write; Close gives up on the close handshake after a second
//     (at once while blocked) and closes the socket. So every call returns
//     soon after its context ends, and a stop is never held by the broker.
//   - With a backlog, the relay holds the connection's writes (Batcher)
//     while it publishes the events already waiting and flushes before it
//     waits for anything, so many publishes cost one TCP write. A publish
//     still counts only once its confirm arrives, so a write that fails
//     after Publish returned loses nothing: the session ends and the event
//     is published again.
//
// NATS JetStream (nats.go) gives the same guarantees with its own means:
//
//   - The subject is Message.Key. Publish uses PublishMsgAsync with
//     Nats-Msg-Id = the row id; Wait waits for the stream's publish ack,
//     which JetStream sends only once the message is stored. An ack for an
//     id the stream already holds within its duplicate window is Acked with
//     Duplicate set and stores nothing: a replay after a crash, within that
//     window, reaches no consumer twice.
//   - "No responders" when no stream captures the subject is Returned,
//     the analogue of an unroutable message. The library's retries on no
//     responders are off, since they would republish out of order.
//   - The connection does not reconnect by itself, and every other failure
//     (lost connection, ack timeout, JetStream unavailable) is an error:
//     the relay reconnects and republishes in order.
//   - Reject refuses subjects NATS cannot take (empty tokens, white space,
//     wildcards), messages over the server's max_payload, which would
//     otherwise close the connection on every retry, headers over
//     JetStream's 64 KiB, and header values nats.go would alter (CR, LF and
//     other control characters, white space at the ends). The dead-letter
//     copy quotes such values and cuts the longest ones until it fits
//     (Outbox-Quoted, Outbox-Cut), or leaves out the header columns and
//     trace headers when even cut they do not fit (Outbox-Dropped), so it
//     is never refused. Header columns are checked like the contract's
//     headers; CloudEvents values are percent-encoded, so they never hold
//     what a header cannot carry.
//   - A cancelled Publish or DeadLetter cuts off a write blocked on a server
//     that stopped reading, and Close closes the socket after a second.
package sink
