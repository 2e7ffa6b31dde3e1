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
// The spool is bounded by a record count and, for SQLite, optionally by
// its file size (SQLiteOptions.MaxBytes, which fails a write exactly as a
// full disk would). When an append would go over a bound, records are
// dropped by class, the oldest of a class first:
//
//  1. raw samples (sampled model inputs, and records whose body this spool
//     does not classify, as a newer agent may add: the most bulky, and
//     each one matters least),
//  2. per-inference records: every inference is folded into its
//     interval's aggregate when it happens, and the oldest ones go first,
//     which are those whose aggregate is already closed and spooled (see
//     RATIONALE.md: when even the open interval's records must go, they go
//     before any aggregate, since the aggregate still counts them),
//  3. aggregates (one per model version and interval: the durable summary
//     of every inference),
//  4. health and rollout events (few, and the rollout engine waits on
//     them), only when nothing else is left.
//
// Every dropped record is counted, in total and per class, and the counts
// survive restarts; they reach the controller as
// ReportedState.spool_dropped and spool_dropped_by_class (Stats.ByClass).
// ReadPriority lets the sender put events first after a reconnect.
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
	// Dropped counts records deleted by the bound, over the spool's life:
	// the sum of the four per-class counts below.
	Dropped uint64
	// DroppedRaw, DroppedInference, DroppedAggregate and DroppedEvent split
	// Dropped by class.
	DroppedRaw, DroppedInference, DroppedAggregate, DroppedEvent uint64
	// LastSeq is the highest sequence number ever given out.
	LastSeq uint64
}

// kind is a record's class for the drop policy. The values are stored in
// spool.db (records.kind), so they never change; dropOrder, not the value,
// says which class goes first.
type kind int

const (
	kindInference kind = 1
	kindEvent     kind = 2
	kindRaw       kind = 3
	kindAggregate kind = 4
)

// dropOrder is the order in which the bound drops classes.
var dropOrder = [...]kind{kindRaw, kindInference, kindAggregate, kindEvent}

func kindOf(r *pb.TelemetryRecord) kind {
	switch r.GetBody().(type) {
	case *pb.TelemetryRecord_Inference:
		return kindInference
	case *pb.TelemetryRecord_Event:
		return kindEvent
	case *pb.TelemetryRecord_Aggregate:
		return kindAggregate
	}
	return kindRaw
}

// Class names, as ReportedState.spool_dropped_by_class and /metrics spell
// them.
const (
	ClassSample    = "sample"
	ClassInference = "inference"
	ClassAggregate = "aggregate"
	ClassEvent     = "event"
)

// ByClass returns the drop counters by class name, every class present.
func (st Stats) ByClass() map[string]uint64 {
	return map[string]uint64{ClassSample: st.DroppedRaw, ClassInference: st.DroppedInference,
		ClassAggregate: st.DroppedAggregate, ClassEvent: st.DroppedEvent}
}

// dropCounts holds the per-class drop counters.
type dropCounts map[kind]uint64

func (d dropCounts) stats(st *Stats) {
	st.DroppedRaw, st.DroppedInference, st.DroppedAggregate, st.DroppedEvent = d[kindRaw], d[kindInference], d[kindAggregate], d[kindEvent]
	st.Dropped = st.DroppedRaw + st.DroppedInference + st.DroppedAggregate + st.DroppedEvent
}

// metaKey names a class's drop counter in spool.db's meta table.
func (k kind) metaKey() string {
	switch k {
	case kindInference:
		return "dropped_inference"
	case kindEvent:
		return "dropped_event"
	case kindAggregate:
		return "dropped_aggregate"
	}
	return "dropped_raw"
}

func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func checkRecords(recs []*pb.TelemetryRecord) error {
	for i, r := range recs {
		// A record without a known body is kept when it carries fields this
		// build does not know (a raw sample from a newer schema): it is
		// spooled as raw, the first class to go.
		if r == nil || (r.GetBody() == nil && len(r.ProtoReflect().GetUnknown()) == 0) {
			return fmt.Errorf("spool append: record %d has no body; set Inference, Aggregate, Sample or Event", i)
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
