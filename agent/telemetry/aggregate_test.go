package telemetry

import (
	"fmt"
	"math"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// clock is a settable fake clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// classifier is a manifest of a three-class model over two features
// (input "x", [-1, 2]) with a reference on both features and on the
// first class's probability.
func classifier() *bundle.Manifest {
	return &bundle.Manifest{
		Name: "risk", Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 2}}},
		Outputs: []bundle.TensorSpec{{Name: "probs", Datatype: "FP32", Shape: []int64{-1, 3}}},
		Labels:  []string{"low", "mid", "high"},
		Reference: &bundle.Reference{Rows: 10,
			Features: []bundle.RefHistogram{
				{Name: "age", Edges: []float64{30, 50, 70}, Counts: []uint64{2, 3, 3, 2}},
				{Name: "bmi", Edges: []float64{25}, Counts: []uint64{5, 5}},
			},
			Outputs: []bundle.RefHistogram{{Name: "probs[0]", Edges: []float64{0.5}, Counts: []uint64{5, 5}}},
		},
	}
}

type collected struct {
	mu   sync.Mutex
	recs []*pb.TelemetryRecord
}

func (c *collected) add(r *pb.TelemetryRecord) {
	c.mu.Lock()
	c.recs = append(c.recs, r)
	c.mu.Unlock()
}
func (c *collected) aggs() []*pb.InferenceAggregate {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*pb.InferenceAggregate
	for _, r := range c.recs {
		out = append(out, r.GetAggregate())
	}
	return out
}

func rows(name string, w int, vals ...float32) tensor.Tensor {
	return tensor.FromFloat32(name, []int64{int64(len(vals) / w), int64(w)}, vals)
}

func TestAggregator(t *testing.T) {
	man := classifier()
	clk := &clock{t: time.UnixMilli(1_700_000_000_000 - 1_700_000_000_000%60_000 + 5_000)}
	var got collected
	a := NewAggregator(AggregatorOptions{Emit: got.add, Now: clk.Now,
		Resolve: func(slot string) (*bundle.Manifest, string) { return man, "r-7" }})
	nan := float32(math.NaN())
	obs := []Observation{
		// age 20 (bucket 0), bmi 30 (1); class 2 at 0.75.
		{Latency: 40 * time.Microsecond, Inputs: []tensor.Tensor{rows("x", 2, 20, 30)}, Outputs: []tensor.Tensor{rows("probs", 3, 0.1, 0.15, 0.75)}},
		// Two rows: age 55 (2) bmi NaN; age 500 (3, out of range: > 70+40) bmi 20 (0);
		// classes 0 at 0.95 and 1 at 0.45.
		{Latency: 2 * time.Millisecond, Inputs: []tensor.Tensor{rows("x", 2, 55, nan, 500, 20)}, Outputs: []tensor.Tensor{rows("probs", 3, 0.95, 0.03, 0.02, 0.3, 0.45, 0.25)}},
		// A failure: inputs still count (age -20 is out of range: < 30-40), outputs do not.
		{Latency: 3 * time.Second, Failed: true, Timeout: true, Inputs: []tensor.Tensor{rows("x", 2, -20, 25)}},
	}
	for i := range obs {
		obs[i].Slot, obs[i].Model, obs[i].Version = "default", "risk", "1.0.0"
		a.Observe(&obs[i])
	}
	// Another version in the interval has its own aggregate, counts only
	// (the slot's manifest is not its).
	a.Observe(&Observation{Slot: "default", Model: "risk", Version: "0.9.0", Latency: time.Millisecond, Inputs: []tensor.Tensor{rows("x", 2, nan, 1)}})
	a.Flush() // the interval has not ended
	if n := len(got.aggs()); n != 0 {
		t.Fatalf("%d aggregates emitted before the interval ended", n)
	}
	clk.Set(clk.Now().Add(time.Minute))
	a.Flush()
	aggs := got.aggs()
	if len(aggs) != 2 {
		t.Fatalf("%d aggregates, want 2: %v", len(aggs), aggs)
	}
	old, cur := aggs[0], aggs[1]
	if old.GetVersion() != "0.9.0" || old.GetCount() != 1 || old.GetNanValues() != 1 || len(old.GetFeatures()) != 0 || len(old.GetOutputs()) != 0 {
		t.Fatalf("aggregate of the version without its manifest: %v", old)
	}
	start := clk.Now().Add(-time.Minute).UnixMilli()
	start -= start % 60_000
	if cur.GetStartUnixMs() != start || cur.GetIntervalMs() != 60_000 || cur.GetRolloutId() != "r-7" || cur.GetSlot() != "default" {
		t.Fatalf("aggregate header %v", cur)
	}
	if cur.GetCount() != 3 || cur.GetErrors() != 1 || cur.GetTimeouts() != 1 || cur.GetNanValues() != 1 || cur.GetOutOfRangeValues() != 2 {
		t.Fatalf("counts %v", cur)
	}
	hist := func(h *pb.NamedHistogram) string {
		return fmt.Sprintf("%s %v %v missing %d", h.GetName(), h.GetHistogram().GetBounds(), h.GetHistogram().GetCounts(), h.GetMissing())
	}
	want := []string{
		"probs[0] [0.5] [2 1] missing 0",
		"probs#class [0.5 1.5] [1 1 1] missing 0",
		"probs#confidence [0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9] [0 0 0 0 1 0 0 1 0 1] missing 0",
	}
	for i, w := range want {
		if i >= len(cur.GetOutputs()) || hist(cur.GetOutputs()[i]) != w {
			t.Fatalf("outputs %v, want %v", cur.GetOutputs(), want)
		}
	}
	wantF := []string{"age [30 50 70] [2 0 1 1] missing 0", "bmi [25] [1 2] missing 1"}
	for i, w := range wantF {
		if i >= len(cur.GetFeatures()) || hist(cur.GetFeatures()[i]) != w {
			t.Fatalf("features %v, want %v", cur.GetFeatures(), wantF)
		}
	}
	lat := cur.GetLatencyUs()
	if len(lat.GetBounds()) != 161 || lat.GetBounds()[0] != 1 || lat.GetBounds()[160] != 1e8 {
		t.Fatalf("latency bounds %v", lat.GetBounds())
	}
	// 40 µs is in [40, 63), 2 ms in [1600, 2500), 3 s in [2.5e6, 4e6).
	for _, c := range []struct {
		us float64
	}{{40}, {2000}, {3e6}} {
		b := bundle.Bucket(lat.GetBounds(), c.us)
		if lat.GetCounts()[b] != 1 {
			t.Fatalf("latency %v µs not counted in bucket %d: %v", c.us, b, lat.GetCounts())
		}
	}
	// The totals for /metrics hold both versions.
	tot := a.Totals()
	if len(tot) != 2 || tot[1].Version != "1.0.0" || tot[1].Count != 3 || tot[1].Errors != 1 || tot[1].Timeouts != 1 ||
		tot[1].LatencySum != 40*time.Microsecond+2*time.Millisecond+3*time.Second {
		t.Fatalf("totals %+v", tot)
	}
	// A stop closes the open interval early; its aggregate has the same
	// key and interval as one closed later would, and merges with it.
	a.Observe(&obs[0])
	a.CloseAll()
	if aggs := got.aggs(); len(aggs) != 3 || aggs[2].GetCount() != 1 || aggs[2].GetStartUnixMs() != start+60_000 {
		t.Fatalf("after CloseAll: %v", aggs[2:])
	}
}

// TestAggregatesMerge checks the property the controller relies on: the
// aggregates of a stream split anywhere add up to the aggregate of the
// whole stream.
func TestAggregatesMerge(t *testing.T) {
	man := classifier()
	base := time.UnixMilli(1_800_000_000_000 - 1_800_000_000_000%60_000)
	run := func(split int, n int) *pb.InferenceAggregate {
		clk := &clock{t: base}
		var got collected
		a := NewAggregator(AggregatorOptions{Emit: got.add, Now: clk.Now, Resolve: func(string) (*bundle.Manifest, string) { return man, "" }})
		for i := range n {
			if i == split {
				a.CloseAll() // an agent restart in the middle of the interval
			}
			v := float32(i % 97)
			a.Observe(&Observation{Slot: "s", Model: "risk", Version: "1.0.0", Latency: time.Duration(i*37) * time.Microsecond, Failed: i%13 == 0,
				Inputs: []tensor.Tensor{rows("x", 2, v, v/3)}, Outputs: []tensor.Tensor{rows("probs", 3, v/100, 0.5, 0.1)}})
		}
		a.CloseAll()
		aggs := got.aggs()
		sum := proto.Clone(aggs[0]).(*pb.InferenceAggregate)
		for _, x := range aggs[1:] {
			mergeInto(t, sum, x)
		}
		return sum
	}
	whole := run(-1, 500)
	for _, split := range []int{1, 250, 499} {
		if got := run(split, 500); !proto.Equal(got, whole) {
			t.Fatalf("split at %d: merged %v\nwhole %v", split, got, whole)
		}
	}
	if q := Quantile(whole.GetLatencyUs(), 0.5); q < 250*37*0.6 || q > 250*37*1.6 {
		t.Fatalf("p50 %v µs, true p50 %v µs", q, 250*37)
	}
}

func mergeInto(t *testing.T, dst, src *pb.InferenceAggregate) {
	t.Helper()
	dst.Count += src.Count
	dst.Errors += src.Errors
	dst.Timeouts += src.Timeouts
	dst.NanValues += src.NanValues
	dst.OutOfRangeValues += src.OutOfRangeValues
	add := func(a, b *pb.Histogram) {
		if fmt.Sprint(a.Bounds) != fmt.Sprint(b.Bounds) {
			t.Fatalf("bounds differ: %v, %v", a.Bounds, b.Bounds)
		}
		for i := range a.Counts {
			a.Counts[i] += b.Counts[i]
		}
	}
	add(dst.LatencyUs, src.LatencyUs)
	for i := range dst.Outputs {
		add(dst.Outputs[i].Histogram, src.Outputs[i].Histogram)
		dst.Outputs[i].Missing += src.Outputs[i].Missing
	}
	for i := range dst.Features {
		add(dst.Features[i].Histogram, src.Features[i].Histogram)
		dst.Features[i].Missing += src.Features[i].Missing
	}
}

func TestQuantile(t *testing.T) {
	h := &pb.Histogram{Bounds: []float64{10, 100}, Counts: []uint64{0, 100, 0}}
	for _, c := range []struct{ q, want float64 }{{0.5, math.Sqrt(10 * 100)}, {0.01, 10 * math.Pow(10, 0.01)}, {1, 100}} {
		if got := Quantile(h, c.q); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	if !math.IsNaN(Quantile(&pb.Histogram{Bounds: []float64{1}, Counts: []uint64{0, 0}}, 0.5)) {
		t.Error("quantile of an empty histogram is not NaN")
	}
}

// BenchmarkObserve is the per-inference cost of aggregation, for a
// grid-anomaly call (one row of 4 FP32 features, one output), with and
// without reference histograms on every feature and the output; "infer"
// is the real grid-anomaly model's Infer on the wazero host in the same
// run, the baseline the folding is a fraction of (BENCHMARKS.md, issue 6).
func BenchmarkObserve(b *testing.B) {
	edges := []float64{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
	man := &bundle.Manifest{Name: "grid-anomaly", Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}},
		Outputs: []bundle.TensorSpec{{Name: "score", Datatype: "FP32", Shape: []int64{-1}}}}
	withRef := *man
	withRef.Reference = &bundle.Reference{Rows: 1, Outputs: []bundle.RefHistogram{{Name: "score", Edges: edges, Counts: make([]uint64, 10)}}}
	for _, f := range []string{"v", "i", "f", "t"} {
		withRef.Reference.Features = append(withRef.Reference.Features, bundle.RefHistogram{Name: f, Edges: []float64{10, 20, 30, 40, 50, 100, 200, 230, 240}, Counts: make([]uint64, 10)})
	}
	in := []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 4}, []float32{231, 10, 50, 35})}
	h := modeltest.NewHost(b, host.Options{PoolSize: 1})
	m, err := h.Load(b.Context(), modeltest.ExampleBundle(b, "grid-anomaly", "1.0.0"))
	if err != nil {
		b.Fatal(err)
	}
	out, err := m.Infer(b.Context(), in)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("infer", func(b *testing.B) {
		defer cpuPerOp(b)()
		for b.Loop() {
			if _, err := m.Infer(b.Context(), in); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, c := range []struct {
		name string
		man  *bundle.Manifest
	}{{"observe/counts-only", man}, {"observe/reference", &withRef}} {
		b.Run(c.name, func(b *testing.B) {
			a := NewAggregator(AggregatorOptions{Emit: func(*pb.TelemetryRecord) {}, Resolve: func(string) (*bundle.Manifest, string) { return c.man, "" }})
			ob := &Observation{Slot: "default", Model: "grid-anomaly", Version: "1.0.0", At: time.Now(), Latency: 42 * time.Microsecond,
				Inputs: in, Outputs: out}
			defer cpuPerOp(b)()
			for b.Loop() {
				a.Observe(ob)
			}
		})
	}
}

// cpuPerOp reports the process's CPU time per op: on a loaded machine
// wall time per op mostly measures the other processes.
func cpuPerOp(b *testing.B) func() {
	start := cpuTime(b)
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
		}
	}
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestBucketMatchesBundle(t *testing.T) {
	edges := []float64{-1, 0, 0.5, 2, 10}
	for _, v := range []float64{-5, -1, -0.5, 0, 0.25, 0.5, 1, 2, 3, 10, 11, math.Inf(1), math.Inf(-1), math.NaN()} {
		if got, want := bucket(edges, v), bundle.Bucket(edges, v); got != want {
			t.Errorf("bucket(%v) = %d, bundle.Bucket = %d", v, got, want)
		}
	}
	if bucket(nil, 3) != 0 {
		t.Error("bucket on no edges is not 0")
	}
}
