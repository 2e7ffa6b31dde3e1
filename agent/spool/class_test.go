package spool

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func agg(i int) *pb.TelemetryRecord {
	return &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Aggregate{Aggregate: &pb.InferenceAggregate{
		Slot: "default", Model: "m", Version: "1.0.0", StartUnixMs: int64(i) * 60_000, IntervalMs: 60_000, Count: uint64(i)}}}
}

func sample(i, size int) *pb.TelemetryRecord {
	return &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Sample{Sample: &pb.RawSample{
		Slot: "default", Model: "m", Version: "1.0.0", AtUnixMs: int64(i), Inputs: bytes.Repeat([]byte{byte(i)}, size)}}}
}

// TestDropOrderWithAggregates checks the whole policy: samples, then
// inference records, then aggregates, then events.
func TestDropOrderWithAggregates(t *testing.T) {
	for _, impl := range implementations {
		t.Run(impl.name, func(t *testing.T) {
			ctx := t.Context()
			s := impl.open(t, 6)
			// 1 agg, 2 inf, 3 ev, 4 sample, 5 inf, 6 agg: full.
			if err := s.Append(ctx, []*pb.TelemetryRecord{agg(1), inf("m", 2), ev(3), sample(4, 10), inf("m", 5), agg(6)}); err != nil {
				t.Fatal(err)
			}
			steps := []struct {
				add                 []*pb.TelemetryRecord
				want                string
				smp, inf, agg, even uint64
			}{
				{[]*pb.TelemetryRecord{ev(7)}, "[1 2 3 5 6 7]", 1, 0, 0, 0},
				{[]*pb.TelemetryRecord{ev(8), ev(9)}, "[1 3 6 7 8 9]", 1, 2, 0, 0},
				// Aggregates go before any event, the oldest first.
				{[]*pb.TelemetryRecord{ev(10)}, "[3 6 7 8 9 10]", 1, 2, 1, 0},
				{[]*pb.TelemetryRecord{ev(11), ev(12)}, "[7 8 9 10 11 12]", 1, 2, 2, 1},
				// A new aggregate into a spool of events is itself the one to go.
				{[]*pb.TelemetryRecord{agg(13)}, "[7 8 9 10 11 12]", 1, 2, 3, 1},
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
				want := map[string]uint64{ClassSample: st.smp, ClassInference: st.inf, ClassAggregate: st.agg, ClassEvent: st.even}
				if fmt.Sprint(got.ByClass()) != fmt.Sprint(want) || got.Dropped != st.smp+st.inf+st.agg+st.even {
					t.Fatalf("step %d: dropped %v (total %d), want %v", i, got.ByClass(), got.Dropped, want)
				}
			}
			// Aggregates and samples read back whole.
			s = impl.open(t, 0)
			if err := s.Append(ctx, []*pb.TelemetryRecord{agg(20), sample(21, 100)}); err != nil {
				t.Fatal(err)
			}
			all, _ := s.Read(ctx, 0, math.MaxUint64, 100)
			if len(all) != 2 || all[0].GetAggregate().GetCount() != 20 || len(all[1].GetSample().GetInputs()) != 100 {
				t.Fatalf("read back %v", all)
			}
		})
	}
}

// TestSQLiteMaxBytes fills a spool whose file is capped, as a small disk
// would be: appends keep succeeding, the file stays under its cap, and
// room is made by the policy (samples, then inference records), with every
// drop counted.
func TestSQLiteMaxBytes(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "spool.db")
	const capBytes = MinMaxBytes
	s, err := OpenSQLiteOptions(ctx, path, SQLiteOptions{MaxBytes: capBytes})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Append(ctx, []*pb.TelemetryRecord{ev(1), agg(2)}); err != nil {
		t.Fatal(err)
	}
	// About 1.6 MB offered to a 256 KiB file: samples of 2 KB and inference
	// records, in batches as the queue writes them.
	var appended uint64 = 2
	for b := range 80 {
		batch := []*pb.TelemetryRecord{sample(b, 2000)}
		for i := range 60 {
			batch = append(batch, inf("m", b*60+i))
		}
		if err := s.Append(ctx, batch); err != nil {
			t.Fatalf("batch %d: %v", b, err)
		}
		appended += uint64(len(batch))
	}
	st := mustStats(t, s)
	if st.Dropped == 0 || st.DroppedRaw == 0 || st.DroppedInference == 0 {
		t.Fatalf("stats %+v: want samples and inference records dropped", st)
	}
	if st.DroppedEvent != 0 || st.DroppedAggregate != 0 {
		t.Fatalf("stats %+v: the event and the aggregate went while other records were left", st)
	}
	if st.Depth+st.Dropped != appended || st.LastSeq != appended {
		t.Fatalf("stats %+v: %d appended; every record must be held or counted as dropped", st, appended)
	}
	all, err := s.Read(ctx, 0, math.MaxUint64, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if uint64(len(all)) != st.Depth || all[0].GetSeq() != 1 || all[1].GetSeq() != 2 {
		t.Fatalf("read %d records, first %v; want %d with the event and aggregate first", len(all), seqs(all[:2]), st.Depth)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() > capBytes {
		t.Fatalf("spool file is %d bytes, over its %d byte cap", fi.Size(), capBytes)
	}
	if _, err := OpenSQLiteOptions(ctx, filepath.Join(t.TempDir(), "x.db"), SQLiteOptions{MaxBytes: 1000}); err == nil {
		t.Fatal("opened a spool capped at 1000 bytes")
	}
}

// TestSQLiteMaxBytesBatchTooBig: a batch that cannot fit even in an empty
// file fails as a whole, naming the fix, and leaves the spool as it was.
func TestSQLiteMaxBytesBatchTooBig(t *testing.T) {
	ctx := t.Context()
	s, err := OpenSQLiteOptions(ctx, filepath.Join(t.TempDir(), "spool.db"), SQLiteOptions{MaxBytes: MinMaxBytes})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Append(ctx, []*pb.TelemetryRecord{ev(1), inf("m", 2)}); err != nil {
		t.Fatal(err)
	}
	var big []*pb.TelemetryRecord
	for i := range 200 {
		big = append(big, sample(i, 2000)) // 400 KB in one transaction
	}
	err = s.Append(ctx, big)
	if err == nil || !strings.Contains(err.Error(), "free disk space") {
		t.Fatalf("append of a batch bigger than the file: %v", err)
	}
	if !isFull(err) {
		t.Fatalf("error %v does not wrap SQLite's full error", err)
	}
	// Room is made in the batch's own transaction, so the failed batch
	// dropped nothing either: the spool is as it was.
	st := mustStats(t, s)
	if st.Depth != 2 || st.Dropped != 0 || st.LastSeq != 2 {
		t.Fatalf("stats after the failed append %+v", st)
	}
	if err := s.Append(ctx, []*pb.TelemetryRecord{inf("m", 3)}); err != nil {
		t.Fatalf("append after the failed one: %v", err)
	}
}
