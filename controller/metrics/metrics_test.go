package metrics

import (
	"net/http/httptest"
	"strings"
	"testing"
)

func TestWriteText(t *testing.T) {
	r := NewRegistry()
	r.Counter("b_total", "B things.").Add(3)
	v := r.CounterVec("a_total", "A things.", "kind")
	v.With("hello").Inc()
	v.With("hello").Inc()
	v.With(`we"ird\`).Inc()
	r.GaugeFunc("c", "C level.", func() float64 { return 1.5 })
	if r.Counter("b_total", "ignored") != r.Counter("b_total", "") {
		t.Fatal("Counter does not return the registered counter")
	}

	rec := httptest.NewRecorder()
	r.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	want := `# HELP a_total A things.
# TYPE a_total counter
a_total{kind="hello"} 2
a_total{kind="we\"ird\\"} 1
# HELP b_total B things.
# TYPE b_total counter
b_total 3
# HELP c C level.
# TYPE c gauge
c 1.5
`
	if got := rec.Body.String(); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Fatalf("Content-Type = %q", ct)
	}
}
