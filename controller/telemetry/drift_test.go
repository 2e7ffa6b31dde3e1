package telemetry

import (
	"context"
	"encoding/json"
	"math"
	"path/filepath"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func openStore(t *testing.T, now func() time.Time) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), store.FileName), store.WithClock(now))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func TestPrunerKeepsWhatIsWithinRetention(t *testing.T) {
	ctx := context.Background()
	t0 := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	now := t0
	st := openStore(t, func() time.Time { return now })
	put := func(seq uint64, at time.Time) {
		rec := store.TelemetryRecord{Seq: seq, Kind: store.RecordInference, Model: "m", Version: "1", At: at, LatencyUS: 100}
		if _, err := st.StoreTelemetryBatches(ctx, []store.TelemetryBatch{{DeviceID: "d", Epoch: "e", Seen: at, Records: []store.TelemetryRecord{rec},
			Body: []byte("raw"), Encoding: store.BodyZstd}}); err != nil {
			t.Fatal(err)
		}
	}
	put(1, t0) // received at t0
	now = t0.Add(3 * 24 * time.Hour)
	put(2, now)
	p := &Pruner{Store: st, RawRetention: 48 * time.Hour, AggRetention: 7 * 24 * time.Hour, Now: func() time.Time { return now }}
	p.Prune(ctx)
	s, err := st.TelemetryStats(ctx, "d")
	if err != nil || s.Records != 1 || s.MinSeq != 2 {
		t.Fatalf("after pruning raw batches older than 2 days: %+v, %v; want only seq 2", s, err)
	}
	if ms, _ := st.Minutes(ctx, store.MinuteQuery{}); len(ms) != 2 {
		t.Fatalf("minute aggregates after the raw prune = %d, want both (7 days)", len(ms))
	}
	now = t0.Add(8 * 24 * time.Hour)
	p.Prune(ctx)
	if ms, _ := st.Minutes(ctx, store.MinuteQuery{}); len(ms) != 1 || !ms[0].Start.Equal(t0.Add(3*24*time.Hour)) {
		t.Fatalf("minute aggregates after 8 days = %+v; want the one from day 3", ms)
	}
}

func TestDriftSource(t *testing.T) {
	ctx := context.Background()
	st := openStore(t, time.Now)
	spec := []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1, 1}}}
	man := bundle.Manifest{ABI: 1, Name: "m", Version: "1.0.0", Inputs: spec, Outputs: spec,
		Reference: &bundle.Reference{Rows: 100, Outputs: []bundle.RefHistogram{{Name: "y", Edges: []float64{0.5}, Counts: []uint64{50, 50}}}}}
	b, err := bundle.New(man, []byte("\x00asm"))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(b.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.PutModel(ctx, store.Model{Name: "m", Version: "1.0.0", Digest: "ab12", Size: 1, Manifest: raw}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	send := func(dev string, seq uint64, counts []uint64) {
		agg := &pb.InferenceAggregate{Model: "m", Version: "1.0.0", StartUnixMs: now.UnixMilli(), IntervalMs: 10_000, Count: counts[0] + counts[1],
			Outputs: []*pb.NamedHistogram{{Name: "y", Histogram: &pb.Histogram{Bounds: []float64{0.5}, Counts: counts}}}}
		if _, err := st.StoreTelemetry(ctx, dev, "e", now, []store.TelemetryRecord{{Seq: seq, Kind: store.RecordAggregate, Aggregate: agg}}); err != nil {
			t.Fatal(err)
		}
	}
	send("a", 1, []uint64{45, 5})
	send("a", 2, []uint64{45, 5})   // merged: 90/10
	send("b", 1, []uint64{0, 1000}) // not in the wave
	in := &rollout.GateInput{Model: "m", Version: "1.0.0", Devices: map[string]bool{"a": true}, Since: now.Add(-time.Minute), Until: now.Add(time.Minute)}
	score, n, err := (&DriftSource{Store: st}).Drift(ctx, in)
	psi := 0.4*math.Log(0.9/0.5) + (-0.4)*math.Log(0.1/0.5)
	if err != nil || n != 100 || math.Abs(score-psi) > 1e-9 {
		t.Fatalf("Drift = %v, %d, %v; want PSI %v over 100 outputs of device a", score, n, err, psi)
	}
	in.Version = "2.0.0"
	if _, _, err := (&DriftSource{Store: st}).Drift(ctx, in); err == nil {
		t.Fatal("drift of a version not in the registry: want an error naming why")
	}
}
