// Package replication owns the logical replication connection: it derives
// the replication connection from the normal database URL, identifies the
// system, creates the pgoutput slot, starts streaming from the slot's
// confirmed position and sends standby status updates.
//
// One goroutine uses a Conn. Receive takes a deadline instead of a context
// so that waiting for the next message costs no goroutine or timer per call:
// at hundreds of keepalives a second that matters (DESIGN.md, measured
// facts).
//
// SendStatus always sets the write, flush and apply positions explicitly:
// pglogrepl copies the write position into flush when flush is zero, which
// would acknowledge what the relay has merely received.
package replication
