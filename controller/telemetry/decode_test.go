package telemetry

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

func seedBatch() *pb.TelemetryBatch {
	agg := &pb.InferenceAggregate{Model: "m", Version: "1", Count: 3, Errors: 1, LatencyUs: summary.NewLatency(),
		Outputs: []*pb.NamedHistogram{{Name: "y", Histogram: &pb.Histogram{Bounds: []float64{0.5}, Counts: []uint64{1, 2}}}}}
	return &pb.TelemetryBatch{SpoolEpoch: "epoch", Records: []*pb.TelemetryRecord{
		{Seq: 1, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{Model: "m", Version: "1", AtUnixMs: 1_790_000_000_000, LatencyUs: 120}}},
		{Seq: 2, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{Model: "m", Version: "1", AtUnixMs: 1_790_000_000_001, LatencyUs: 9, Error: "timed out"}}},
		{Seq: 3, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{Model: "n", Version: "2"}}},
		{Seq: 4, Body: &pb.TelemetryRecord_Event{Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_HEALTHY, Slot: "default", Model: &pb.ModelRef{Name: "m", Version: "1"}}}},
		{Seq: 5, Body: &pb.TelemetryRecord_Aggregate{Aggregate: agg}},
		{Seq: 6, Body: &pb.TelemetryRecord_Sample{Sample: &pb.RawSample{Model: "m", Version: "1", Inputs: []byte("EFT1")}}},
		{Seq: 7},
	}}
}

// slowDecode decodes raw the slow, obviously right way.
func slowDecode(id string, seen time.Time, raw []byte) (Decoded, error) {
	var b pb.TelemetryBatch
	if err := proto.Unmarshal(raw, &b); err != nil {
		return Decoded{}, err
	}
	d := Decoded{Epoch: b.GetSpoolEpoch()}
	for _, r := range b.GetRecords() {
		d.Records = append(d.Records, recordFrom(id, r, seen))
	}
	return d, nil
}

func sameRecords(t *testing.T, got, want []store.TelemetryRecord) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d records, want %d", len(got), len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Seq != w.Seq || g.Kind != w.Kind || g.Model != w.Model || g.Version != w.Version || !g.At.Equal(w.At) ||
			g.LatencyUS != w.LatencyUS || g.Error != w.Error || (g.Event == nil) != (w.Event == nil) ||
			(g.Event != nil && *g.Event != *w.Event) || !proto.Equal(g.Aggregate, w.Aggregate) {
			t.Fatalf("record %d = %+v, want %+v", i, g, w)
		}
	}
}

func TestDecodeBatch(t *testing.T) {
	seen := time.UnixMilli(1_790_000_100_000)
	raw, err := proto.Marshal(seedBatch())
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeBatch("d", seen, raw)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := slowDecode("d", seen, raw)
	if got.Epoch != "epoch" {
		t.Fatalf("epoch %q", got.Epoch)
	}
	all := got.All(seen)
	sameRecords(t, all, want.Records)
	kinds := []string{store.RecordInference, store.RecordInference, store.RecordInference, store.RecordEvent, store.RecordAggregate, store.RecordSample, store.RecordOther}
	for i, k := range kinds {
		if all[i].Kind != k {
			t.Errorf("record %d is %q, want %q", i, all[i].Kind, k)
		}
	}
	// Inference records are compact rows; the rest full records.
	if len(got.Inferences) != 3 || len(got.Records) != 4 || len(got.Names) != 2 || len(got.Errors) != 1 {
		t.Errorf("%d rows (names %v, errors %v) and %d records, want 3 (2 names, 1 error) and 4", len(got.Inferences), got.Names, got.Errors, len(got.Records))
	}
	// Seqs that do not ascend: full records only, in batch order.
	b := seedBatch()
	b.Records[0].Seq, b.Records[1].Seq = 2, 1
	raw2, _ := proto.Marshal(b)
	got2, err := DecodeBatch("d", seen, raw2)
	if err != nil {
		t.Fatal(err)
	}
	want2, _ := slowDecode("d", seen, raw2)
	if len(got2.Inferences) != 0 {
		t.Errorf("%d compact rows from a batch whose seqs do not ascend", len(got2.Inferences))
	}
	sameRecords(t, got2.All(seen), want2.Records)
	if _, err := DecodeBatch("d", seen, raw[:len(raw)-3]); !errors.Is(err, ErrMalformed) {
		t.Errorf("truncated batch: %v", err)
	}
	if _, err := DecodeBatch("d", seen, make([]byte, wire.MaxDecompressed+1)); !errors.Is(err, wire.ErrTooLarge) {
		t.Errorf("oversized batch: %v", err)
	}
}

// BenchmarkDecodeBatch compares the ingest decoder with proto.Unmarshal
// of the same batch of 256 inference records.
func BenchmarkDecodeBatch(b *testing.B) {
	batch := &pb.TelemetryBatch{SpoolEpoch: "0123456789abcdef0123456789abcdef"}
	for i := range 256 {
		batch.Records = append(batch.Records, &pb.TelemetryRecord{Seq: uint64(i + 1), Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
			Model: "grid-anomaly", Version: "1.4.2", AtUnixMs: 1_790_000_000_000 + int64(i), LatencyUs: uint32(150 + i%90)}}})
	}
	raw, _ := proto.Marshal(batch)
	seen := time.Now()
	b.Run("DecodeBatch", func(b *testing.B) {
		for range b.N {
			if _, err := DecodeBatch("d", seen, raw); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("proto.Unmarshal", func(b *testing.B) {
		for range b.N {
			if _, err := slowDecode("d", seen, raw); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// FuzzDecodeBatch holds DecodeBatch to proto.Unmarshal: whatever
// proto.Unmarshal reads, DecodeBatch reads the same; whatever DecodeBatch
// refuses, proto.Unmarshal refuses.
func FuzzDecodeBatch(f *testing.F) {
	raw, _ := proto.Marshal(seedBatch())
	f.Add(raw)
	f.Add([]byte{})
	f.Add([]byte{0x12, 0x04, 0x08, 0x01, 0x12, 0x00}) // a record with an empty inference
	twice, _ := proto.Marshal(&pb.TelemetryRecord{Seq: 1, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{Model: "a"}}})
	twice = append(twice, twice[2:]...) // the body field again: merged
	f.Add(append([]byte{0x12, byte(len(twice))}, twice...))
	seen := time.UnixMilli(1_790_000_000_000)
	f.Fuzz(func(t *testing.T, raw []byte) {
		got, err := DecodeBatch("d", seen, raw)
		want, werr := slowDecode("d", seen, raw)
		if werr != nil {
			return // DecodeBatch may accept what proto.Unmarshal refuses (invalid UTF-8): the store takes bytes
		}
		if err != nil {
			t.Fatalf("DecodeBatch: %v; proto.Unmarshal reads it", err)
		}
		if got.Epoch != want.Epoch {
			t.Fatalf("epoch %q, want %q", got.Epoch, want.Epoch)
		}
		sameRecords(t, got.All(seen), want.Records)
	})
}

// TestDecodeLayouts feeds DecodeBatch records laid out in every way the
// fast path must either read exactly or leave to the general reader, and
// holds the result to proto.Unmarshal's.
func TestDecodeLayouts(t *testing.T) {
	str := func(b []byte, num protowire.Number, v string) []byte {
		b = protowire.AppendTag(b, num, protowire.BytesType)
		return protowire.AppendString(b, v)
	}
	num := func(b []byte, n protowire.Number, v uint64) []byte {
		b = protowire.AppendTag(b, n, protowire.VarintType)
		return protowire.AppendVarint(b, v)
	}
	ordered := func(model, version string, at, latency uint64, errText string) []byte {
		var b []byte
		if model != "" {
			b = str(b, 1, model)
		}
		if version != "" {
			b = str(b, 2, version)
		}
		if at != 0 {
			b = num(b, 3, at)
		}
		if latency != 0 {
			b = num(b, 4, latency)
		}
		if errText != "" {
			b = str(b, 5, errText)
		}
		return b
	}
	record := func(seq uint64, body []byte) []byte {
		b := num(nil, 1, seq)
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		return protowire.AppendBytes(b, body)
	}
	batch := func(recs ...[]byte) []byte {
		b := str(nil, 1, "epoch")
		for _, r := range recs {
			b = protowire.AppendTag(b, 2, protowire.BytesType)
			b = protowire.AppendBytes(b, r)
		}
		return b
	}
	const at = 1_790_000_000_000
	a := ordered("grid-anomaly", "1.4.2", at, 150, "")
	for _, c := range []struct {
		name string
		raw  []byte
	}{
		{"agent layout", batch(record(1, a), record(2, ordered("grid-anomaly", "1.4.2", at+1, 151, "timed out")), record(3, a))},
		{"version changes", batch(record(1, a), record(2, ordered("grid-anomaly", "1.5.0", at, 90, "")), record(3, a))},
		{"the last byte of the version changes", batch(record(1, a), record(2, ordered("grid-anomaly", "1.4.3", at, 90, "")), record(3, a))},
		{"a longer version after a match", batch(record(1, ordered("m", "1", at, 1, "")), record(2, ordered("m", "10", at, 1, "")))},
		{"no names", batch(record(1, ordered("", "", at, 5, "")), record(2, ordered("", "", 0, 0, "")), record(3, a))},
		{"model only", batch(record(1, ordered("m", "", at, 5, "")), record(2, ordered("m", "2", at, 5, "")))},
		{"fields reversed", batch(record(1, a), record(2, num(num(str(str(nil, 2, "1.4.2"), 1, "grid-anomaly"), 4, 7), 3, at)), record(3, a))},
		{"a name repeated", batch(record(1, a), record(2, str(a, 1, "other")), record(3, a))},
		{"latency repeated", batch(record(1, num(a, 4, 999)), record(2, a))},
		{"an unknown field", batch(record(1, num(a, 9, 1)), record(2, a))},
		{"seq after body", batch(append(protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), a), num(nil, 1, 7)...), record(8, a))},
		{"seqs descend", batch(record(5, a), record(4, a), record(6, a))},
		{"negative time", batch(record(1, num(str(str(nil, 1, "m"), 2, "1"), 3, uint64(1<<64-1000))), record(2, a))},
		{"huge latency", batch(record(1, ordered("m", "1", at, 1<<40, "")), record(2, a))},
	} {
		t.Run(c.name, func(t *testing.T) {
			seen := time.UnixMilli(at)
			want, err := slowDecode("d", seen, c.raw)
			if err != nil {
				t.Fatalf("proto.Unmarshal refuses the case: %v", err)
			}
			got, err := DecodeBatch("d", seen, c.raw)
			if err != nil {
				t.Fatalf("DecodeBatch: %v", err)
			}
			sameRecords(t, got.All(seen), want.Records)
		})
	}
}
