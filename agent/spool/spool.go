// Package spool buffers the agent's telemetry records on the device until
// the controller says it has stored them.
//
// A spool is an append-only log of pb.TelemetryRecord values. Append gives
// every record the next sequence number; sequence numbers are never reused,
// even after the records that held them were deleted, so (device, epoch, seq)
// names one record forever. The epoch is a random id made when the spool is
// created: a device whose spool file was lost starts a new epoch and the
// controller can tell its new seq 1 from the old one.
//
// The spool is bounded by a record count. When an append would go over it,
// the oldest inference records are dropped first (they are the most
// numerous and each one matters least), then the oldest records of any kind;
// every dropped record is counted, and the count survives restarts.
//
// Two implementations share one behaviour, checked by one conformance test:
// SQLite (the agent's durable spool, DATA/spool.db) and Memory (for the fleet
// simulator, where thousands of agents share a process and durability does
// not matter).
package spool

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// DefaultMaxRecords bounds a spool when the caller sets no bound.
const DefaultMaxRecords = 1_000_000

// ErrClosed is returned by every call on a closed spool.
var ErrClosed = errors.New("spool is closed")

// Stats describes a spool at one moment.
type Stats struct {
	// Depth is the number of records waiting in the spool.
	Depth uint64
	// Dropped counts records deleted by the bound, over the spool's life.
	Dropped uint64
	// LastSeq is the highest sequence number ever given out.
	LastSeq uint64
}

// kind orders records for the drop policy: lower kinds go first.
type kind int

const (
	kindInference kind = 1
	kindEvent     kind = 2
	kindOther     kind = 3
)

func kindOf(r *pb.TelemetryRecord) kind {
	switch r.GetBody().(type) {
	case *pb.TelemetryRecord_Inference:
		return kindInference
	case *pb.TelemetryRecord_Event:
		return kindEvent
	}
	return kindOther
}

func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func checkRecords(recs []*pb.TelemetryRecord) error {
	for i, r := range recs {
		if r == nil || r.GetBody() == nil {
			return fmt.Errorf("spool append: record %d has no body; set Inference or Event", i)
		}
	}
	return nil
}

// inRanges reports whether seq lies in one of the inclusive ranges.
func inRanges(seq uint64, ranges []*pb.SeqRange) bool {
	for _, r := range ranges {
		if seq >= r.GetFirst() && seq <= r.GetLast() {
			return true
		}
	}
	return false
}
