package spool

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/encoding/protowire"
)

// spool is the behaviour every implementation shares.
type spool interface {
	Epoch() string
	Append(ctx context.Context, recs []*pb.TelemetryRecord) error
	Read(ctx context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error)
	ReadPriority(ctx context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error)
	Delete(ctx context.Context, ranges []*pb.SeqRange) (int, error)
	Stats(ctx context.Context) (Stats, error)
	Close() error
}

var implementations = []struct {
	name string
	open func(t *testing.T, max uint64) spool
}{
	{"sqlite", func(t *testing.T, max uint64) spool {
		s, err := OpenSQLite(t.Context(), filepath.Join(t.TempDir(), "spool.db"), max)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}},
	{"memory", func(t *testing.T, max uint64) spool { return NewMemory(max) }},
}

func inf(model string, i int) *pb.TelemetryRecord {
	return &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
		Model: model, Version: "1.0.0", AtUnixMs: int64(1000 + i), LatencyUs: uint32(i),
	}}}
}

func ev(i int) *pb.TelemetryRecord {
	return &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Event{Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_ACTIVATED, Generation: uint64(i)}}}
}

// raw is a record whose body this build does not know (as a raw input
// sample from a newer schema would be): field 9, bytes.
func raw(i int) *pb.TelemetryRecord {
	r := &pb.TelemetryRecord{}
	b := protowire.AppendTag(nil, 9, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte(fmt.Sprintf("sample-%d", i)))
	r.ProtoReflect().SetUnknown(b)
	return r
}

func seqs(recs []*pb.TelemetryRecord) []uint64 {
	out := make([]uint64, len(recs))
	for i, r := range recs {
		out[i] = r.GetSeq()
	}
	return out
}

func mustStats(t *testing.T, s spool) Stats {
	t.Helper()
	st, err := s.Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestConformance(t *testing.T) {
	for _, impl := range implementations {
		t.Run(impl.name, func(t *testing.T) {
			t.Run("AppendReadDelete", func(t *testing.T) {
				ctx := t.Context()
				s := impl.open(t, 0)
				if len(s.Epoch()) != 32 {
					t.Fatalf("epoch %q, want 32 hex digits", s.Epoch())
				}
				var batch []*pb.TelemetryRecord
				for i := range 5 {
					batch = append(batch, inf("m", i))
				}
				if err := s.Append(ctx, batch); err != nil {
					t.Fatal(err)
				}
				if got := fmt.Sprint(seqs(batch)); got != "[1 2 3 4 5]" {
					t.Fatalf("assigned seqs %s", got)
				}
				got, err := s.Read(ctx, 2, math.MaxUint64, 2)
				if err != nil {
					t.Fatal(err)
				}
				if fmt.Sprint(seqs(got)) != "[2 3]" || got[0].GetInference().GetLatencyUs() != 1 || got[1].GetInference().GetModel() != "m" {
					t.Fatalf("read %v", got)
				}
				n, err := s.Delete(ctx, []*pb.SeqRange{{First: 1, Last: 2}, {First: 4, Last: 4}, {First: 9, Last: 20}})
				if err != nil || n != 3 {
					t.Fatalf("delete = %d, %v; want 3", n, err)
				}
				rest, _ := s.Read(ctx, 0, math.MaxUint64, 100)
				if fmt.Sprint(seqs(rest)) != "[3 5]" {
					t.Fatalf("after delete: %v", seqs(rest))
				}
				if st := mustStats(t, s); st.Depth != 2 || st.LastSeq != 5 || st.Dropped != 0 {
					t.Fatalf("stats %+v", st)
				}
			})
			t.Run("SeqsNeverReused", func(t *testing.T) {
				ctx := t.Context()
				s := impl.open(t, 0)
				if err := s.Append(ctx, []*pb.TelemetryRecord{inf("m", 1), inf("m", 2)}); err != nil {
					t.Fatal(err)
				}
				if _, err := s.Delete(ctx, []*pb.SeqRange{{First: 1, Last: 2}}); err != nil {
					t.Fatal(err)
				}
				r := inf("m", 3)
				if err := s.Append(ctx, []*pb.TelemetryRecord{r}); err != nil {
					t.Fatal(err)
				}
				if r.GetSeq() != 3 {
					t.Fatalf("seq after deleting the newest = %d, want 3", r.GetSeq())
				}
			})
			t.Run("BoundDropsOldestInferenceFirst", func(t *testing.T) {
				ctx := t.Context()
				s := impl.open(t, 4)
				// seq 1 event, 2-3 inference, 4 event, then 3 more inferences.
				if err := s.Append(ctx, []*pb.TelemetryRecord{ev(1), inf("m", 2), inf("m", 3), ev(4)}); err != nil {
					t.Fatal(err)
				}
				if err := s.Append(ctx, []*pb.TelemetryRecord{inf("m", 5), inf("m", 6)}); err != nil {
					t.Fatal(err)
				}
				all, _ := s.Read(ctx, 0, math.MaxUint64, 100)
				if got := fmt.Sprint(seqs(all)); got != "[1 4 5 6]" {
					t.Fatalf("after bound: %s, want [1 4 5 6]", got)
				}
				// Only events left besides the new ones: the oldest of any kind goes.
				if err := s.Append(ctx, []*pb.TelemetryRecord{ev(7), ev(8), ev(9)}); err != nil {
					t.Fatal(err)
				}
				all, _ = s.Read(ctx, 0, math.MaxUint64, 100)
				if got := fmt.Sprint(seqs(all)); got != "[4 7 8 9]" {
					t.Fatalf("after second bound: %s", got)
				}
				st := mustStats(t, s)
				if st.Depth != 4 || st.Dropped != 5 || st.LastSeq != 9 {
					t.Fatalf("stats %+v, want depth 4 dropped 5 last 9", st)
				}
			})
			t.Run("DropOrderByClass", func(t *testing.T) {
				ctx := t.Context()
				s := impl.open(t, 6)
				// 1 ev, 2 raw, 3 inf, 4 raw, 5 ev, 6 inf: full.
				if err := s.Append(ctx, []*pb.TelemetryRecord{ev(1), raw(2), inf("m", 3), raw(4), ev(5), inf("m", 6)}); err != nil {
					t.Fatal(err)
				}
				steps := []struct {
					add  []*pb.TelemetryRecord
					want string
					// dropped raw, inference, event so far
					raw, inf, ev uint64
				}{
					// Raw samples go first, even when inference records are older.
					{[]*pb.TelemetryRecord{ev(7)}, "[1 3 4 5 6 7]", 1, 0, 0},
					{[]*pb.TelemetryRecord{ev(8), ev(9)}, "[1 5 6 7 8 9]", 2, 1, 0},
					// Then per-inference records; events only when nothing else is left.
					{[]*pb.TelemetryRecord{ev(10), ev(11)}, "[5 7 8 9 10 11]", 2, 2, 1},
					// A raw sample arriving into a spool of events is itself the one to go.
					{[]*pb.TelemetryRecord{raw(12)}, "[5 7 8 9 10 11]", 3, 2, 1},
				}
				for i, st := range steps {
					if err := s.Append(ctx, st.add); err != nil {
						t.Fatal(err)
					}
					all, err := s.Read(ctx, 0, math.MaxUint64, 100)
					if err != nil {
						t.Fatal(err)
					}
					if got := fmt.Sprint(seqs(all)); got != st.want {
						t.Fatalf("step %d: kept %s, want %s", i, got, st.want)
					}
					got := mustStats(t, s)
					if got.DroppedRaw != st.raw || got.DroppedInference != st.inf || got.DroppedEvent != st.ev ||
						got.Dropped != st.raw+st.inf+st.ev || got.Depth != 6 {
						t.Fatalf("step %d: stats %+v, want dropped raw %d inference %d event %d", i, got, st.raw, st.inf, st.ev)
					}
				}
			})
			t.Run("RawRoundTrips", func(t *testing.T) {
				ctx := t.Context()
				s := impl.open(t, 0)
				if err := s.Append(ctx, []*pb.TelemetryRecord{raw(1)}); err != nil {
					t.Fatal(err)
				}
				all, err := s.Read(ctx, 0, math.MaxUint64, 10)
				if err != nil || len(all) != 1 {
					t.Fatalf("read %v, %v", all, err)
				}
				want := raw(1).ProtoReflect().GetUnknown()
				if got := all[0].ProtoReflect().GetUnknown(); string(got) != string(want) || all[0].GetSeq() != 1 {
					t.Fatalf("raw record read back as seq %d %x, want seq 1 %x", all[0].GetSeq(), got, want)
				}
			})
			t.Run("ReadPriority", func(t *testing.T) {
				ctx := t.Context()
				s := impl.open(t, 0)
				if err := s.Append(ctx, []*pb.TelemetryRecord{inf("m", 1), ev(2), raw(3), inf("m", 4), ev(5), ev(6), inf("m", 7)}); err != nil {
					t.Fatal(err)
				}
				for _, c := range []struct {
					from, to uint64
					limit    int
					want     string
				}{
					{0, math.MaxUint64, 10, "[2 5 6]"},
					{3, math.MaxUint64, 10, "[5 6]"},
					{0, 5, 10, "[2 5]"},
					{0, math.MaxUint64, 2, "[2 5]"},
					{7, math.MaxUint64, 10, "[]"},
				} {
					got, err := s.ReadPriority(ctx, c.from, c.to, c.limit)
					if err != nil {
						t.Fatal(err)
					}
					if fmt.Sprint(seqs(got)) != c.want {
						t.Errorf("ReadPriority(%d, %d, %d) = %v, want %s", c.from, c.to, c.limit, seqs(got), c.want)
					}
					for _, r := range got {
						if r.GetEvent() == nil {
							t.Errorf("ReadPriority returned a non-event %v", r)
						}
					}
				}
			})
			t.Run("RefusesEmptyRecord", func(t *testing.T) {
				s := impl.open(t, 0)
				if err := s.Append(t.Context(), []*pb.TelemetryRecord{{}}); err == nil {
					t.Fatal("append of a record without a body succeeded")
				}
			})
			t.Run("Closed", func(t *testing.T) {
				s := impl.open(t, 0)
				s.Close()
				if err := s.Append(t.Context(), []*pb.TelemetryRecord{inf("m", 1)}); err != ErrClosed {
					t.Fatalf("append after close: %v", err)
				}
			})
		})
	}
}

func TestBoundPrefersInference(t *testing.T) {
	// Within one append, inference records are dropped before events even
	// when the events are older.
	for _, impl := range implementations {
		t.Run(impl.name, func(t *testing.T) {
			s := impl.open(t, 2)
			if err := s.Append(t.Context(), []*pb.TelemetryRecord{ev(1), inf("m", 2), inf("m", 3), ev(4)}); err != nil {
				t.Fatal(err)
			}
			all, _ := s.Read(t.Context(), 0, math.MaxUint64, 10)
			if got := fmt.Sprint(seqs(all)); got != "[1 4]" {
				t.Fatalf("kept %s, want the events [1 4]", got)
			}
		})
	}
}

func TestSQLiteReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "spool.db")
	s, err := OpenSQLite(ctx, path, 3)
	if err != nil {
		t.Fatal(err)
	}
	epoch := s.Epoch()
	if err := s.Append(ctx, []*pb.TelemetryRecord{inf("a", 1), inf("b", 2), inf("c", 3), inf("d", 4)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, []*pb.SeqRange{{First: 4, Last: 4}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = OpenSQLite(ctx, path, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Epoch() != epoch {
		t.Fatalf("epoch changed on reopen: %s -> %s", epoch, s.Epoch())
	}
	st := mustStats(t, s)
	if st.Depth != 2 || st.Dropped != 1 || st.DroppedInference != 1 || st.LastSeq != 4 {
		t.Fatalf("after reopen stats %+v, want depth 2 dropped 1 (inference) last 4", st)
	}
	all, _ := s.Read(ctx, 0, math.MaxUint64, 10)
	if fmt.Sprint(seqs(all)) != "[2 3]" || all[0].GetInference().GetModel() != "b" {
		t.Fatalf("records after reopen: %v", all)
	}
	r := inf("e", 5)
	if err := s.Append(ctx, []*pb.TelemetryRecord{r}); err != nil || r.GetSeq() != 5 {
		t.Fatalf("append after reopen: seq %d, %v; want 5", r.GetSeq(), err)
	}

	// A new file is a new epoch.
	other, err := OpenSQLite(ctx, filepath.Join(t.TempDir(), "spool.db"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if other.Epoch() == epoch {
		t.Fatal("two spool files share an epoch")
	}
}

func TestSQLiteRefusesNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "spool.db")
	s, err := OpenSQLite(t.Context(), path, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.Exec(`UPDATE meta SET value = '99' WHERE key = 'schema'`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := OpenSQLite(t.Context(), path, 0); err == nil {
		t.Fatal("opened a spool with schema 99")
	}
}

func TestQueueBatchesAndFlushesOnStop(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	s, err := OpenSQLite(ctx, filepath.Join(t.TempDir(), "spool.db"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var flushes atomic.Int32
	q := NewQueue(s, QueueOptions{MaxBatch: 10, Interval: time.Millisecond, Flushed: func() { flushes.Add(1) }})
	done := make(chan error)
	go func() { done <- q.Run(ctx) }()
	for i := range 25 {
		if !q.Add(inf("m", i)) {
			t.Fatal("queue refused a record while nearly empty")
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for mustStats(t, s).Depth != 25 {
		if time.Now().After(deadline) {
			t.Fatalf("queue wrote %d of 25 records", mustStats(t, s).Depth)
		}
		time.Sleep(time.Millisecond)
	}
	// Records queued right before stop are written by the final flush.
	q.Add(inf("m", 99))
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if f := flushes.Load(); f < 4 || f > 26 {
		t.Fatalf("%d flushes for 25 records with batch 10, then 1 more", f)
	}
	if d := mustStats(t, s).Depth; d != 26 {
		t.Fatalf("depth after stop %d, want 26", d)
	}
}

func TestQueueFullDrops(t *testing.T) {
	q := NewQueue(NewMemory(0), QueueOptions{Capacity: 2})
	q.Add(inf("m", 1))
	q.Add(inf("m", 2))
	if q.Add(inf("m", 3)) {
		t.Fatal("full queue accepted a record")
	}
	if q.Dropped() != 1 {
		t.Fatalf("dropped = %d, want 1", q.Dropped())
	}
	q.Add(agg(4))
	if by := q.DroppedByClass(); q.Dropped() != 2 || by[ClassInference] != 1 || by[ClassAggregate] != 1 || by[ClassEvent] != 0 {
		t.Fatalf("dropped %d by class %v, want one inference and one aggregate", q.Dropped(), by)
	}
}

func BenchmarkSQLiteAppend(b *testing.B) {
	s, err := OpenSQLite(b.Context(), filepath.Join(b.TempDir(), "spool.db"), 0)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	batch := make([]*pb.TelemetryRecord, 256)
	for b.Loop() {
		for i := range batch {
			batch[i] = inf("m", i)
		}
		if err := s.Append(b.Context(), batch); err != nil {
			b.Fatal(err)
		}
	}
}

// TestSQLiteRareClassesUseTheirIndex guards the partial index: events and
// raw samples are found without walking every inference record.
func TestSQLiteRareClassesUseTheirIndex(t *testing.T) {
	s, err := OpenSQLite(t.Context(), filepath.Join(t.TempDir(), "spool.db"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, q := range []string{
		`SELECT seq, body FROM records WHERE kind <> 1 AND kind = 2 AND seq >= 1 AND seq <= 10 ORDER BY seq LIMIT 5`,
		`SELECT seq FROM records WHERE kind <> 1 AND kind = 3 ORDER BY seq LIMIT 5`,
	} {
		rows, err := s.db.QueryContext(t.Context(), `EXPLAIN QUERY PLAN `+q)
		if err != nil {
			t.Fatal(err)
		}
		var plan string
		for rows.Next() {
			var id, parent, notused int
			var detail string
			if err := rows.Scan(&id, &parent, &notused, &detail); err != nil {
				t.Fatal(err)
			}
			plan += detail + "; "
		}
		rows.Close()
		if !strings.Contains(plan, "records_rare") {
			t.Errorf("query %q does not use records_rare: %s", q, plan)
		}
	}
}

func TestSQLiteDropCountsSurviveReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "spool.db")
	s, err := OpenSQLite(ctx, path, 2)
	if err != nil {
		t.Fatal(err)
	}
	// 1 raw, 2 event, 3 inf, 4 event, 5 event: drops raw 1, inf 3, event 2.
	if err := s.Append(ctx, []*pb.TelemetryRecord{raw(1), ev(2), inf("m", 3), ev(4), ev(5)}); err != nil {
		t.Fatal(err)
	}
	want := Stats{Depth: 2, Dropped: 3, DroppedRaw: 1, DroppedInference: 1, DroppedEvent: 1, LastSeq: 5}
	if st := mustStats(t, s); st != want {
		t.Fatalf("stats %+v, want %+v", st, want)
	}
	s.Close()
	if s, err = OpenSQLite(ctx, path, 2); err != nil {
		t.Fatal(err)
	}
	if st := mustStats(t, s); st != want {
		t.Fatalf("after reopen stats %+v, want %+v", st, want)
	}
	// A spool from before the per-class counters holds only the total,
	// which was all inference records.
	if _, err := s.db.ExecContext(ctx, `DELETE FROM meta WHERE key LIKE 'dropped_%'`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped', '7')`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s, err = OpenSQLite(ctx, path, 2); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st := mustStats(t, s); st.Dropped != 7 || st.DroppedInference != 7 {
		t.Fatalf("old spool's drop count read as %+v, want 7 inference", st)
	}
}
