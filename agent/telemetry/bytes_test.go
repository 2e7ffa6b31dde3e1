package telemetry

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// BenchmarkWireBytes reports what telemetry costs on the wire, whole MQTT
// payloads (envelope included) divided by what they carry:
//
//   - record/plain, record/zstd: a batch of 500 per-inference records as
//     the agent spools them (grid-anomaly, 100 calls/s, latencies around
//     50 µs), sealed as Envelope.telemetry and as telemetry_zstd;
//   - aggregate/plain, aggregate/zstd: one minute's InferenceAggregate of
//     the same calls with the reference histograms of a 4-feature,
//     1-output model, alone in a batch (the worst case: a quiet device
//     sends one per minute) and in a batch of 20 (a backlog after an
//     outage).
//
// BENCHMARKS.md, issue 6.
func BenchmarkWireBytes(b *testing.B) {
	enc, err := wire.SharedBatchEncoder()
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	start := time.UnixMilli(1_800_000_000_000)
	recs := make([]*pb.TelemetryRecord, 500)
	for i := range recs {
		recs[i] = &pb.TelemetryRecord{Seq: uint64(100_000 + i), Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
			Model: "grid-anomaly", Version: "1.0.0", AtUnixMs: start.Add(time.Duration(i)*10*time.Millisecond + time.Duration(rng.IntN(3000))*time.Microsecond).UnixMilli(),
			LatencyUs: uint32(35 + rng.IntN(40))}}}
	}
	epoch := "5f0e3c1d9a7b4e2f8c6d0a1b3e5f7a9c"
	measure := func(b *testing.B, batch *pb.TelemetryBatch, per int, compressed bool) {
		var n int
		defer cpuPerOp(b)()
		for b.Loop() {
			var body proto.Message = batch
			if compressed {
				z, err := enc.Compress(batch)
				if err != nil {
					b.Fatal(err)
				}
				body = &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: z}}
			}
			p, err := wire.Seal("pos-17", time.Now(), body)
			if err != nil {
				b.Fatal(err)
			}
			n = len(p)
		}
		b.ReportMetric(float64(n)/float64(per), "wire-bytes/item")
	}
	records := &pb.TelemetryBatch{SpoolEpoch: epoch, Records: recs}
	b.Run("record/plain", func(b *testing.B) { measure(b, records, len(recs), false) })
	b.Run("record/zstd", func(b *testing.B) { measure(b, records, len(recs), true) })

	// One minute of the same calls (6000 at 100/s) folded into aggregates.
	edges := []float64{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
	man := &bundle.Manifest{Name: "grid-anomaly", Version: "1.0.0",
		Inputs:    []bundle.TensorSpec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}},
		Outputs:   []bundle.TensorSpec{{Name: "score", Datatype: "FP32", Shape: []int64{-1}}},
		Reference: &bundle.Reference{Rows: 1, Outputs: []bundle.RefHistogram{{Name: "score", Edges: edges, Counts: make([]uint64, 10)}}}}
	for _, f := range []string{"volts", "amps", "hertz", "celsius"} {
		man.Reference.Features = append(man.Reference.Features, bundle.RefHistogram{Name: f, Edges: []float64{10, 20, 30, 40, 50, 100, 200, 230, 240}, Counts: make([]uint64, 10)})
	}
	var aggs []*pb.TelemetryRecord
	for m := range 20 {
		clk := &clock{t: start.Add(time.Duration(m) * time.Minute)}
		a := NewAggregator(AggregatorOptions{Now: clk.Now, Emit: func(r *pb.TelemetryRecord) { r.Seq = uint64(200_000 + m); aggs = append(aggs, r) },
			Resolve: func(string) (*bundle.Manifest, string) { return man, "r-20261127-1" }})
		for range 6000 {
			v := []float32{225 + rng.Float32()*10, 5 + rng.Float32()*10, 49.9 + rng.Float32()*0.2, 20 + rng.Float32()*20}
			a.Observe(&Observation{Slot: "default", Model: "grid-anomaly", Version: "1.0.0", Latency: time.Duration(35+rng.IntN(40)) * time.Microsecond,
				Inputs:  []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 4}, v)},
				Outputs: []tensor.Tensor{tensor.FromFloat32("score", []int64{1}, []float32{rng.Float32() * 0.3})}})
		}
		a.CloseAll()
	}
	one := &pb.TelemetryBatch{SpoolEpoch: epoch, Records: aggs[:1]}
	twenty := &pb.TelemetryBatch{SpoolEpoch: epoch, Records: aggs}
	b.Run("aggregate/plain/1", func(b *testing.B) { measure(b, one, 1, false) })
	b.Run("aggregate/zstd/1", func(b *testing.B) { measure(b, one, 1, true) })
	b.Run("aggregate/plain/20", func(b *testing.B) { measure(b, twenty, 20, false) })
	b.Run("aggregate/zstd/20", func(b *testing.B) { measure(b, twenty, 20, true) })
}
