package decoder

import (
	"encoding/binary"
	"time"
)

// Hand-built pgoutput (protocol v1) frames, per the PostgreSQL
// "Logical Replication Message Formats" chapter.

type frame []byte

func (f frame) u8(v byte) frame      { return append(f, v) }
func (f frame) u16(v uint16) frame   { return binary.BigEndian.AppendUint16(f, v) }
func (f frame) u32(v uint32) frame   { return binary.BigEndian.AppendUint32(f, v) }
func (f frame) u64(v uint64) frame   { return binary.BigEndian.AppendUint64(f, v) }
func (f frame) str(s string) frame   { return append(append(f, s...), 0) }
func (f frame) raw(b []byte) frame   { return append(f, b...) }
func (f frame) ts(t time.Time) frame { return f.u64(uint64(toPGTime(t))) }

func toPGTime(t time.Time) int64 {
	return t.Sub(time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)).Microseconds()
}

// val is one TupleData column.
type val struct {
	kind byte // 't', 'n', 'u', 'b'
	data string
}

func txt(s string) val { return val{kind: 't', data: s} }

var (
	null      = val{kind: 'n'}
	unchanged = val{kind: 'u'}
)

func (f frame) tuple(vals []val) frame {
	f = f.u16(uint16(len(vals)))
	for _, v := range vals {
		f = f.u8(v.kind)
		if v.kind == 't' || v.kind == 'b' {
			f = f.u32(uint32(len(v.data))).raw([]byte(v.data))
		}
	}
	return f
}

func relationFrame(id uint32, ns, name string, cols ...string) []byte {
	f := frame{'R'}.u32(id).str(ns).str(name).u8('d').u16(uint16(len(cols)))
	for i, c := range cols {
		var flags byte
		if i == 0 {
			flags = 1
		}
		f = f.u8(flags).str(c).u32(25).u32(0xffffffff)
	}
	return f
}

func beginFrame(finalLSN uint64, commit time.Time, xid uint32) []byte {
	return frame{'B'}.u64(finalLSN).ts(commit).u32(xid)
}

func commitFrame(commitLSN, endLSN uint64, commit time.Time) []byte {
	return frame{'C'}.u8(0).u64(commitLSN).u64(endLSN).ts(commit)
}

func insertFrame(id uint32, vals ...val) []byte {
	return frame{'I'}.u32(id).u8('N').tuple(vals)
}

func updateFrame(id uint32, old []val, vals ...val) []byte {
	f := frame{'U'}.u32(id)
	if old != nil {
		f = f.u8('O').tuple(old)
	}
	return f.u8('N').tuple(vals)
}

func deleteFrame(id uint32, key ...val) []byte {
	return frame{'D'}.u32(id).u8('K').tuple(key)
}

func truncateFrame(ids ...uint32) []byte {
	f := frame{'T'}.u32(uint32(len(ids))).u8(0)
	for _, id := range ids {
		f = f.u32(id)
	}
	return f
}

func messageFrame(transactional bool, prefix, content string) []byte {
	var flags byte
	if transactional {
		flags = 1
	}
	return frame{'M'}.u8(flags).u64(0x16B3748).str(prefix).u32(uint32(len(content))).raw([]byte(content))
}

func typeFrame(oid uint32, ns, name string) []byte {
	return frame{'Y'}.u32(oid).str(ns).str(name)
}

func originFrame(lsn uint64, name string) []byte {
	return frame{'O'}.u64(lsn).str(name)
}

// The outbox table as migrations create it.
var outboxCols = []string{"id", "aggregate_type", "aggregate_id", "event_type", "payload", "occurred_at", "published_at"}

const (
	outboxRel = 16384
	otherRel  = 16400
	testID    = "0b5a1c9e-6f1d-4b43-9d0a-3f2e7c1a8b11"
	testAggID = "7d3f0c2a-1b4e-4c6d-8e9f-0a1b2c3d4e5f"
	testTS    = "2026-11-27 04:05:04.123456+00"
)

// row returns the values of a standard outbox row with the given payload.
func row(payload string) []val {
	return []val{txt(testID), txt("order"), txt(testAggID), txt("order.created"), txt(payload), txt(testTS), null}
}
