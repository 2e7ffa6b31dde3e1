package spool

import (
	"context"
	"sort"
	"sync"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// Memory is a spool held in memory, with the same behaviour as SQLite but
// nothing survives the process. The fleet simulator uses it.
type Memory struct {
	max   uint64
	epoch string

	mu      sync.Mutex
	closed  bool
	recs    []*pb.TelemetryRecord // ascending seq
	last    uint64
	dropped dropCounts
}

// NewMemory returns an empty in-memory spool with a new epoch. maxRecords
// bounds it; 0 means DefaultMaxRecords.
func NewMemory(maxRecords uint64) *Memory {
	if maxRecords == 0 {
		maxRecords = DefaultMaxRecords
	}
	return &Memory{max: maxRecords, epoch: newEpoch(), dropped: dropCounts{}}
}

// Epoch returns the spool's random id.
func (m *Memory) Epoch() string { return m.epoch }

// Append stores copies of recs and sets each record's Seq.
func (m *Memory) Append(_ context.Context, recs []*pb.TelemetryRecord) error {
	if err := checkRecords(recs); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	for _, r := range recs {
		m.last++
		r.Seq = m.last
		m.recs = append(m.recs, proto.Clone(r).(*pb.TelemetryRecord))
	}
	if excess := uint64(len(m.recs)); excess > m.max {
		excess -= m.max
		// One pass per class in drop order, the oldest of a class first.
		for _, k := range dropOrder {
			if excess == 0 {
				break
			}
			keep := m.recs[:0]
			for _, r := range m.recs {
				if excess > 0 && kindOf(r) == k {
					excess--
					m.dropped[k]++
					continue
				}
				keep = append(keep, r)
			}
			clear(m.recs[len(keep):])
			m.recs = keep
		}
	}
	return nil
}

// ReadPriority returns up to limit health and rollout events with
// from <= seq <= to, in seq order.
func (m *Memory) ReadPriority(_ context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	i := sort.Search(len(m.recs), func(i int) bool { return m.recs[i].GetSeq() >= from })
	var out []*pb.TelemetryRecord
	for ; i < len(m.recs) && len(out) < limit && m.recs[i].GetSeq() <= to; i++ {
		if kindOf(m.recs[i]) == kindEvent {
			out = append(out, proto.Clone(m.recs[i]).(*pb.TelemetryRecord))
		}
	}
	return out, nil
}

// Read returns up to limit records with from <= seq <= to, in seq order.
func (m *Memory) Read(_ context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	i := sort.Search(len(m.recs), func(i int) bool { return m.recs[i].GetSeq() >= from })
	var out []*pb.TelemetryRecord
	for ; i < len(m.recs) && len(out) < limit && m.recs[i].GetSeq() <= to; i++ {
		out = append(out, proto.Clone(m.recs[i]).(*pb.TelemetryRecord))
	}
	return out, nil
}

// Delete removes the records whose seqs lie in ranges.
func (m *Memory) Delete(_ context.Context, ranges []*pb.SeqRange) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, ErrClosed
	}
	keep := m.recs[:0]
	for _, r := range m.recs {
		if !inRanges(r.GetSeq(), ranges) {
			keep = append(keep, r)
		}
	}
	n := len(m.recs) - len(keep)
	clear(m.recs[len(keep):])
	m.recs = keep
	return n, nil
}

// Stats returns the spool's depth, drop count and last seq.
func (m *Memory) Stats(context.Context) (Stats, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return Stats{}, ErrClosed
	}
	st := Stats{Depth: uint64(len(m.recs)), LastSeq: m.last}
	m.dropped.stats(&st)
	return st, nil
}

// Close drops the records. Later calls return ErrClosed.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed, m.recs = true, nil
	return nil
}
