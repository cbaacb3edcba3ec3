// Package faulttest holds the fault-injection tests of outbox-relay: the
// relay binary runs as a subprocess against the real PostgreSQL and
// RabbitMQ while the tests kill it, stop the broker, restart the database,
// cut or silence connections (through an in-process TCP proxy) and lose the
// slot. Each test asserts against the table itself: every committed row is
// delivered at least once and marked, and the slot is never acknowledged
// past work that is not done.
//
// The tests stop and restart shared services, so they carry the build tag
// "faults" and `make test` runs them on their own, after the other
// packages, with -p 1. TestLostSlot lowers max_slot_wal_keep_size for a few
// seconds: an inactive slot of anyone else on the same server that lags
// far enough behind is invalidated too (a relay recovers from that by
// sweeping its table, which is what the test shows).
// TestStopWhileRabbitMQBlocksPublishers raises RabbitMQ's memory alarm for
// a few seconds, which blocks every publisher on the broker, not only the
// relay; it restores the watermark it read before, at cleanup too.
// TestSIGKILLAsSynchronousStandby changes synchronous_standby_names, so it
// runs on a primary and standby of its own (scripts/cluster.sh), never on
// the shared server.
package faulttest
