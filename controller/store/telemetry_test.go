package store

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// TestTelemetryExactlyOnceShuffled resends overlapping, reordered and
// regrouped batches, as an agent does after reconnects (events first,
// acks lost, batches re-read with other boundaries), some in one group
// commit, and checks every seq is stored exactly once and every inference
// counted once in the minute aggregates.
func TestTelemetryExactlyOnceShuffled(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	rng := rand.New(rand.NewPCG(1, 2))
	const n = 3000
	rec := func(seq uint64) TelemetryRecord {
		r := TelemetryRecord{Seq: seq, Kind: RecordInference, Model: "m", Version: "1", At: t0.Add(time.Duration(seq) * 50 * time.Millisecond), LatencyUS: uint32(100 + seq%50)}
		if seq%10 == 0 {
			r.Error = "timed out"
		}
		if seq%97 == 0 {
			r = TelemetryRecord{Seq: seq, Kind: RecordEvent, At: t0, Event: &Event{Kind: "healthy", At: t0}}
		}
		return r
	}
	var wantInf, wantErr int64
	for seq := uint64(1); seq <= n; seq++ {
		if r := rec(seq); r.Kind == RecordInference {
			wantInf++
			if r.Error != "" {
				wantErr++
			}
		}
	}
	for round := range 40 {
		var group []TelemetryBatch
		for range 1 + rng.IntN(4) {
			lo := uint64(1 + rng.IntN(n))
			hi := min(lo+uint64(rng.IntN(300)), n)
			var recs []TelemetryRecord
			for seq := lo; seq <= hi; seq++ {
				if rng.IntN(4) > 0 { // holes, filled by later rounds
					recs = append(recs, rec(seq))
				}
			}
			rng.Shuffle(len(recs), func(i, j int) { recs[i], recs[j] = recs[j], recs[i] })
			if len(recs) > 0 {
				recs = append(recs, recs[0]) // a repeat inside the batch
			}
			group = append(group, TelemetryBatch{DeviceID: "d", Epoch: "e", Seen: t0, Records: recs})
		}
		if round == 39 { // finally, everything, in order
			var recs []TelemetryRecord
			for seq := uint64(1); seq <= n; seq++ {
				recs = append(recs, rec(seq))
			}
			group = append(group, TelemetryBatch{DeviceID: "d", Epoch: "e", Seen: t0, Records: recs})
		}
		if _, err := s.StoreTelemetryBatches(ctx, group); err != nil {
			t.Fatal(err)
		}
	}
	st, err := s.TelemetryStats(ctx, "d")
	if err != nil || st.Records != n || st.Distinct != n || st.MinSeq != 1 || st.MaxSeq != n || st.Inferences != wantInf {
		t.Fatalf("TelemetryStats = %+v, %v; want %d records once each, %d inferences", st, err, n, wantInf)
	}
	var ranges int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM telemetry_seqs WHERE device_id = 'd'`).Scan(&ranges); err != nil || ranges != 1 {
		t.Fatalf("dedupe ranges = %d, %v; want one after every seq arrived", ranges, err)
	}
	ms, err := s.Minutes(ctx, MinuteQuery{Model: "m", Version: "1"})
	if err != nil {
		t.Fatal(err)
	}
	var count, errs, timeouts, lat uint64
	for _, m := range ms {
		count += m.Aggregate.Count
		errs += m.Aggregate.Errors
		timeouts += m.Aggregate.Timeouts
		lat += summary.Total(m.Aggregate.LatencyUs)
	}
	if int64(count) != wantInf || int64(errs) != wantErr || timeouts != errs || count-errs != lat {
		t.Fatalf("minutes count %d errors %d timeouts %d latencies %d; want %d inferences, %d errors", count, errs, timeouts, lat, wantInf, wantErr)
	}
	d, err := s.Device(ctx, "d")
	if err != nil || d.Inferences != wantInf || d.InferenceErrors != wantErr {
		t.Fatalf("device counters %d/%d, %v", d.Inferences, d.InferenceErrors, err)
	}
}

func TestAgentAggregatesWinAndPrune(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	// Per-inference records and the agent's aggregate of the same minute:
	// the aggregate counts, not both.
	recs := []TelemetryRecord{
		{Seq: 1, Kind: RecordInference, Model: "m", Version: "1", At: t0, LatencyUS: 100},
		{Seq: 2, Kind: RecordInference, Model: "m", Version: "1", At: t0, LatencyUS: 100},
	}
	agg := &pb.InferenceAggregate{Slot: "default", Model: "m", Version: "1", StartUnixMs: t0.UnixMilli(), IntervalMs: 10_000, Count: 5, Errors: 1,
		LatencyUs: summary.NewLatency(),
		Outputs:   []*pb.NamedHistogram{{Name: "y", Histogram: &pb.Histogram{Bounds: []float64{0.5}, Counts: []uint64{1, 3}}}}}
	summary.Observe(agg.LatencyUs, 200, 4)
	later := proto.Clone(agg).(*pb.InferenceAggregate)
	later.StartUnixMs += 10_000 // same minute, next interval: merged
	recs = append(recs,
		TelemetryRecord{Seq: 3, Kind: RecordAggregate, Aggregate: agg},
		TelemetryRecord{Seq: 4, Kind: RecordAggregate, Aggregate: later})
	if _, err := s.StoreTelemetry(ctx, "d", "e", t0, recs); err != nil {
		t.Fatal(err)
	}
	if _, err := s.StoreTelemetry(ctx, "d", "e", t0, recs); err != nil { // resent: ignored
		t.Fatal(err)
	}
	ms, err := s.Minutes(ctx, MinuteQuery{Model: "m", DeviceIDs: []string{"d"}})
	if err != nil || len(ms) != 2 {
		t.Fatalf("Minutes = %d rows, %v; want the folded records and the agent's", len(ms), err)
	}
	auth := Authoritative(ms)
	if len(auth) != 1 || auth[0].Source != SourceAgent || auth[0].Aggregate.Count != 10 || auth[0].Aggregate.Outputs[0].Histogram.Counts[1] != 6 {
		t.Fatalf("Authoritative = %+v", auth)
	}
	if got, _ := s.InferenceSamples(ctx, "m", "1", t0, t0, 100); len(got) != 10 {
		t.Fatalf("InferenceSamples = %d, want the aggregate's 10", len(got))
	}
	if ms, _ := s.Minutes(ctx, MinuteQuery{DeviceIDs: []string{"other"}}); len(ms) != 0 {
		t.Fatalf("Minutes of another device = %+v", ms)
	}

	b, m, err := s.PruneTelemetry(ctx, time.Now().Add(time.Hour), t0.Add(time.Minute), 1000)
	if err != nil || b != 1 || m != 2 {
		t.Fatalf("PruneTelemetry = %d batches, %d minutes, %v", b, m, err)
	}
	// The dedupe outlives the raw rows: a late resend is still a duplicate.
	res, err := s.StoreTelemetry(ctx, "d", "e", t0, recs)
	if err != nil || res.Inserted != 0 || res.Duplicates != 4 {
		t.Fatalf("resend after prune = %+v, %v", res, err)
	}
}

func TestSpansRoundTrip(t *testing.T) {
	for _, seqs := range [][]uint64{{1}, {1, 2, 3, 7, 9, 10}, {0, 1 << 63, 1<<64 - 1}} {
		rs := spans(slices.Clone(seqs))
		got, err := decodeSpans(encodeSpans(rs))
		if err != nil || !slices.Equal(got, rs) {
			t.Errorf("spans %v -> %v, %v", rs, got, err)
		}
	}
}

// FuzzDecodeSpans: the decoder of stored seq ranges never panics.
func FuzzDecodeSpans(f *testing.F) {
	f.Add(encodeSpans([]span{{1, 5}, {9, 9}}))
	f.Add([]byte{0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = decodeSpans(b)
	})
}

// compact splits records into full records (all but inferences) and compact
// rows, as the controller's decoder hands them over.
func compact(b TelemetryBatch) TelemetryBatch {
	out := b
	out.Records = nil
	for _, r := range b.Records {
		if r.Kind != RecordInference {
			out.Records = append(out.Records, r)
			continue
		}
		row := InferenceRow{Seq: r.Seq, LatencyUS: r.LatencyUS}
		if !r.At.Equal(b.Seen) {
			row.AtMS = r.At.UnixMilli()
		}
		out.Names = append(out.Names, ModelVersion{r.Model, r.Version})
		row.Name = uint32(len(out.Names) - 1)
		if r.Error != "" {
			out.Errors = append(out.Errors, r.Error)
			row.Error = uint32(len(out.Errors))
		}
		out.Inferences = append(out.Inferences, row)
	}
	return out
}

// TestTelemetryCompactRowsMatchRecords stores the same batches as full
// records in one store and with compact inference rows in another, through
// resends, repeats, reordering and several model versions, and wants the
// same results, minute aggregates, seqs and counters from both.
func TestTelemetryCompactRowsMatchRecords(t *testing.T) {
	ctx := context.Background()
	full, rows := newStore(t), newStore(t)
	rng := rand.New(rand.NewPCG(3, 4))
	errs := []string{"", "", "", "timed out", "model trapped", "context deadline exceeded"}
	rec := func(seq uint64) TelemetryRecord {
		r := TelemetryRecord{Seq: seq, Kind: RecordInference, Model: "m", Version: []string{"1", "2"}[seq/40%2],
			At: t0.Add(time.Duration(seq) * 700 * time.Millisecond), LatencyUS: uint32(rng.IntN(5000)), Error: errs[rng.IntN(len(errs))]}
		switch {
		case seq%53 == 0:
			r = TelemetryRecord{Seq: seq, Kind: RecordEvent, At: t0, Event: &Event{Kind: "healthy", At: t0}}
		case seq%31 == 0:
			r.At = t0 // no time of its own: the batch's
		}
		return r
	}
	const n = 1500
	all := make([]TelemetryRecord, n+1)
	for seq := uint64(1); seq <= n; seq++ {
		all[seq] = rec(seq)
	}
	for round := range 20 {
		var group []TelemetryBatch
		for range 1 + rng.IntN(4) {
			lo := uint64(1 + rng.IntN(n))
			hi := min(lo+uint64(rng.IntN(400)), n)
			recs := slices.Clone(all[lo : hi+1])
			switch rng.IntN(3) {
			case 0:
				rng.Shuffle(len(recs), func(i, j int) { recs[i], recs[j] = recs[j], recs[i] })
			case 1:
				recs = append(recs, recs[rng.IntN(len(recs))]) // a repeat
			}
			group = append(group, TelemetryBatch{DeviceID: []string{"a", "b"}[rng.IntN(2)], Epoch: "e", Seen: t0.Add(time.Duration(round) * time.Minute), Records: recs})
		}
		want, err := full.StoreTelemetryBatches(ctx, group)
		if err != nil {
			t.Fatal(err)
		}
		var cgroup []TelemetryBatch
		for _, b := range group {
			cgroup = append(cgroup, compact(b))
		}
		got, err := rows.StoreTelemetryBatches(ctx, cgroup)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("round %d: compact rows stored %+v, full records %+v", round, got, want)
		}
	}
	for _, dev := range []string{"a", "b"} {
		ws, err1 := full.TelemetryStats(ctx, dev)
		gs, err2 := rows.TelemetryStats(ctx, dev)
		if err1 != nil || err2 != nil || gs != ws || gs.Records != gs.Distinct {
			t.Fatalf("device %s: compact %+v (%v), full %+v (%v)", dev, gs, err2, ws, err1)
		}
		wd, _ := full.Device(ctx, dev)
		gd, _ := rows.Device(ctx, dev)
		if gd.Inferences != wd.Inferences || gd.InferenceErrors != wd.InferenceErrors || wd.Inferences == 0 {
			t.Fatalf("device %s counters: compact %d/%d, full %d/%d", dev, gd.Inferences, gd.InferenceErrors, wd.Inferences, wd.InferenceErrors)
		}
	}
	wm, err1 := full.Minutes(ctx, MinuteQuery{})
	gm, err2 := rows.Minutes(ctx, MinuteQuery{})
	if err1 != nil || err2 != nil || len(gm) != len(wm) || len(wm) < 10 {
		t.Fatalf("%d minutes compact (%v), %d full (%v)", len(gm), err2, len(wm), err1)
	}
	key := func(m Minute) string { return m.DeviceID + "/" + m.Version + "/" + m.Start.String() }
	byKey := map[string]Minute{}
	for _, m := range wm {
		byKey[key(m)] = m
	}
	for _, m := range gm {
		w, ok := byKey[key(m)]
		if !ok || !proto.Equal(m.Aggregate, w.Aggregate) {
			t.Fatalf("minute %s: compact %v, full %v", key(m), m.Aggregate, w.Aggregate)
		}
	}
}

func TestShortLatencyBuckets(t *testing.T) {
	for v := range shortLatency {
		if got, want := int(shortLatency[v]), summary.Bucket(summary.LatencyBounds, float64(v)); got != want {
			t.Fatalf("latency %d µs: bucket %d, want %d", v, got, want)
		}
	}
}
