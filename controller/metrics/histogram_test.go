package metrics

import (
	"strings"
	"testing"
)

func TestHistogramAndGaugeVec(t *testing.T) {
	r := NewRegistry()
	h := r.Histogram("lat_seconds", "Latency.", []float64{0.1, 1})
	for _, v := range []float64{0.05, 0.1, 0.5, 3} {
		h.Observe(v)
	}
	r.GaugeVecFunc("drops", "Drops.", func() []Sample {
		return []Sample{{Labels: []string{"class", "sample"}, Value: 7}, {Labels: []string{"class", `a"b`}, Value: 1}}
	})
	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	want := `# HELP drops Drops.
# TYPE drops gauge
drops{class="a\"b"} 1
drops{class="sample"} 7
# HELP lat_seconds Latency.
# TYPE lat_seconds histogram
lat_seconds_bucket{le="0.1"} 2
lat_seconds_bucket{le="1"} 3
lat_seconds_bucket{le="+Inf"} 4
lat_seconds_sum 3.65
lat_seconds_count 4
`
	if b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
	if h.Count() != 4 || h.Mean() != 3.65/4 {
		t.Fatalf("count %d mean %v", h.Count(), h.Mean())
	}
}
