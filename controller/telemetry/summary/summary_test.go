package summary

import (
	"math"
	"slices"
	"testing"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func TestDrift(t *testing.T) {
	cases := []struct {
		name     string
		ref, obs []uint64
		psi, js  float64
	}{
		// Proportions r = (0.5, 0.5), o = (0.9, 0.1):
		// PSI = 0.4·ln(0.9/0.5) + (−0.4)·ln(0.1/0.5) = 0.235115 + 0.643775;
		// m = (0.7, 0.3), JS = ½[0.5·log2(0.5/0.7) + 0.5·log2(0.5/0.3)]
		//                     + ½[0.9·log2(0.9/0.7) + 0.1·log2(0.1/0.3)].
		{"shifted", []uint64{50, 50}, []uint64{90, 10}, 0.8788898309, 0.1467931024},
		// An empty reference bin counts as Epsilon:
		// PSI = (0.5−1)·ln(0.5/1) + (0.5−0.0001)·ln(0.5/0.0001).
		{"empty reference bin", []uint64{100, 0}, []uint64{50, 50}, 4.6043184667, 0.3112781245},
		{"reversed", []uint64{10, 20, 30, 40}, []uint64{40, 30, 20, 10}, 0.9128696383, 0.1535606553},
		{"same shape, other totals", []uint64{1, 2, 3}, []uint64{100, 200, 300}, 0, 0},
		{"disjoint", []uint64{10, 0}, []uint64{0, 10}, 2 * (1 - Epsilon) * math.Log(1/Epsilon), 1},
		{"nothing observed", []uint64{1, 2}, []uint64{0, 0}, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			psi, err := PSI(c.ref, c.obs)
			if err != nil || math.Abs(psi-c.psi) > 1e-9 {
				t.Errorf("PSI = %.10f, %v; want %.10f", psi, err, c.psi)
			}
			js, err := JS(c.ref, c.obs)
			if err != nil || math.Abs(js-c.js) > 1e-9 {
				t.Errorf("JS = %.10f, %v; want %.10f", js, err, c.js)
			}
		})
	}
	if _, err := PSI([]uint64{1, 2}, []uint64{1, 2, 3}); err == nil {
		t.Error("PSI of different bin counts: want an error")
	}
}

func TestQuantile(t *testing.T) {
	h := &pb.Histogram{Bounds: []float64{10, 20, 30}, Counts: make([]uint64, 4)}
	// 10 values in [10,20), 10 in [20,30).
	Observe(h, 15, 10)
	Observe(h, 20, 10)
	cases := []struct{ q, want float64 }{
		{0.05, 11}, // rank 1 of the 10 in [10,20)
		{0.5, 20},  // rank 10: the top of the first bucket
		{0.95, 29}, // rank 19: 9/10 of the way through [20,30)
		{1, 30},
	}
	for _, c := range cases {
		if got := Quantile(h, c.q); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	Observe(h, 1000, 80) // open-ended top bucket reads as the last bound
	if got := Quantile(h, 0.99); got != 30 {
		t.Errorf("Quantile(0.99) with overflow = %v, want 30", got)
	}
	if got := Quantile(&pb.Histogram{}, 0.5); got != 0 {
		t.Errorf("Quantile of empty = %v", got)
	}
}

func TestLatencyBoundsResolution(t *testing.T) {
	if !slices.IsSorted(LatencyBounds) || LatencyBounds[0] != 1 || LatencyBounds[len(LatencyBounds)-1] < 60e6 {
		t.Fatalf("LatencyBounds %v..%v", LatencyBounds[0], LatencyBounds[len(LatencyBounds)-1])
	}
	// Every latency from 20 µs up reads back within 10 %.
	for _, v := range []float64{20, 150, 999, 12_345, 2_000_000} {
		h := NewLatency()
		Observe(h, v, 1)
		if got := Quantile(h, 1); math.Abs(got-v)/v > 0.1 {
			t.Errorf("latency %v reads back as %v", v, got)
		}
	}
}

func TestMerge(t *testing.T) {
	a := &pb.InferenceAggregate{Count: 3, Errors: 1, LatencyUs: NewLatency(),
		Outputs: []*pb.NamedHistogram{{Name: "score", Histogram: &pb.Histogram{Bounds: []float64{0.5}, Counts: []uint64{2, 1}}}}}
	Observe(a.LatencyUs, 100, 3)
	b := &pb.InferenceAggregate{Count: 2, Timeouts: 1, Errors: 1, NanValues: 4, LatencyUs: NewLatency(),
		Outputs: []*pb.NamedHistogram{
			{Name: "score", Histogram: &pb.Histogram{Bounds: []float64{0.5}, Counts: []uint64{0, 2}}, Missing: 1},
			{Name: "other", Histogram: &pb.Histogram{Bounds: []float64{1}, Counts: []uint64{1, 1}}},
		}}
	Observe(b.LatencyUs, 200, 2)
	if err := MergeAggregate(a, b); err != nil {
		t.Fatal(err)
	}
	if a.Count != 5 || a.Errors != 2 || a.Timeouts != 1 || a.NanValues != 4 || Total(a.LatencyUs) != 5 {
		t.Fatalf("merged = %v", a)
	}
	if !slices.Equal(a.Outputs[0].Histogram.Counts, []uint64{2, 3}) || a.Outputs[0].Missing != 1 || len(a.Outputs) != 2 {
		t.Fatalf("merged outputs = %v", a.Outputs)
	}
	// Other bounds rebin at the lower edge without losing counts.
	c := &pb.Histogram{Bounds: []float64{0, 10}, Counts: []uint64{0, 0, 0}}
	if err := Merge(c, &pb.Histogram{Bounds: []float64{5, 50}, Counts: []uint64{1, 2, 3}}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Counts, []uint64{1, 2, 3}) {
		t.Fatalf("rebinned = %v", c.Counts)
	}
	if err := Merge(c, &pb.Histogram{Bounds: []float64{1}, Counts: []uint64{1}}); err == nil {
		t.Fatal("merging a malformed histogram: want an error")
	}
}

func TestMidpoint(t *testing.T) {
	bounds := []float64{100, 200, 400}
	for _, c := range []struct {
		i    int
		want float64
	}{{0, 100}, {1, 150}, {2, 300}, {3, 400}} {
		if got := Midpoint(bounds, c.i); got != c.want {
			t.Errorf("Midpoint(%v, %d) = %v, want %v", bounds, c.i, got, c.want)
		}
	}
	if got := Midpoint(nil, 0); got != 0 {
		t.Errorf("Midpoint(nil, 0) = %v, want 0", got)
	}
}
