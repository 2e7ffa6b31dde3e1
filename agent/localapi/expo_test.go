package localapi

import (
	"bytes"
	"math"
	"testing"
)

func TestExposition(t *testing.T) {
	var b bytes.Buffer
	e := NewExposition(&b)
	e.Family("x_total", "counter", "Help with a \\ and\na newline.")
	e.Sample("x_total", nil, 3)
	e.Sample("x_total", []string{"model", `we"ird\name` + "\n", "v", "1"}, math.Inf(1))
	e.Family("lat_seconds", "histogram", "Latency.")
	e.Histogram("lat_seconds", []string{"m", "a"}, []float64{0.001, 0.01}, []uint64{2, 0, 3}, 0.5)
	want := `# HELP x_total Help with a \\ and\na newline.
# TYPE x_total counter
x_total 3
x_total{model="we\"ird\\name\n",v="1"} +Inf
# HELP lat_seconds Latency.
# TYPE lat_seconds histogram
lat_seconds_bucket{m="a",le="0.001"} 2
lat_seconds_bucket{m="a",le="0.01"} 2
lat_seconds_bucket{m="a",le="+Inf"} 5
lat_seconds_sum{m="a"} 0.5
lat_seconds_count{m="a"} 5
`
	if b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
	if e.Err() != nil {
		t.Fatal(e.Err())
	}
}
