package metrics

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// LatencyBuckets are upper bounds, in seconds, for latencies from 100 µs
// to 10 s.
var LatencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// Histogram counts observations into cumulative buckets, as Prometheus
// histograms do.
type Histogram struct {
	help    string
	bounds  []float64
	mu      sync.Mutex
	counts  []uint64 // per bucket, not cumulative; the last is +Inf
	sum     float64
	samples uint64
}

// Observe records one value.
func (h *Histogram) Observe(v float64) {
	i, _ := slices.BinarySearch(h.bounds, v) // first bound >= v: le semantics
	h.mu.Lock()
	h.counts[i]++
	h.sum += v
	h.samples++
	h.mu.Unlock()
}

// Count returns how many values were observed.
func (h *Histogram) Count() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.samples
}

// Mean returns the mean of the observed values, 0 if none.
func (h *Histogram) Mean() float64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.samples == 0 {
		return 0
	}
	return h.sum / float64(h.samples)
}

func (h *Histogram) write(w io.Writer, name string) error {
	h.mu.Lock()
	counts, sum, n := slices.Clone(h.counts), h.sum, h.samples
	h.mu.Unlock()
	if _, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s histogram\n", name, h.help, name); err != nil {
		return err
	}
	var cum uint64
	for i, b := range h.bounds {
		cum += counts[i]
		if _, err := fmt.Fprintf(w, "%s_bucket{le=%q} %d\n", name, strconv.FormatFloat(b, 'g', -1, 64), cum); err != nil {
			return err
		}
	}
	_, err := fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %s\n%s_count %d\n", name, n, name, strconv.FormatFloat(sum, 'g', -1, 64), name, n)
	return err
}

// Histogram returns the histogram called name with the given bucket upper
// bounds (ascending), creating it on first use.
func (r *Registry) Histogram(name, help string, bounds []float64) *Histogram {
	m := r.register(name, func() metric {
		return &Histogram{help: help, bounds: slices.Clone(bounds), counts: make([]uint64, len(bounds)+1)}
	})
	return m.(*Histogram)
}

// Sample is one labelled value of a gauge family.
type Sample struct {
	// Labels are name, value pairs.
	Labels []string
	Value  float64
}

// gaugeVecFunc is a gauge family read when the metrics are rendered.
type gaugeVecFunc struct {
	help string
	fn   func() []Sample
}

func (g gaugeVecFunc) write(w io.Writer, name string) error {
	if _, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n", name, g.help, name); err != nil {
		return err
	}
	samples := g.fn()
	lines := make([]string, 0, len(samples))
	for _, s := range samples {
		var b strings.Builder
		b.WriteString(name)
		if len(s.Labels) > 0 {
			b.WriteByte('{')
			for i := 0; i+1 < len(s.Labels); i += 2 {
				if i > 0 {
					b.WriteByte(',')
				}
				b.WriteString(s.Labels[i] + "=" + quote(s.Labels[i+1]))
			}
			b.WriteByte('}')
		}
		v := s.Value
		if math.IsNaN(v) {
			continue
		}
		b.WriteString(" " + strconv.FormatFloat(v, 'g', -1, 64) + "\n")
		lines = append(lines, b.String())
	}
	slices.Sort(lines)
	for _, l := range lines {
		if _, err := io.WriteString(w, l); err != nil {
			return err
		}
	}
	return nil
}

// GaugeVecFunc registers a labelled gauge family whose samples fn returns
// at render time (a second registration replaces fn). fn runs on the
// scraper's request; it must be quick.
func (r *Registry) GaugeVecFunc(name, help string, fn func() []Sample) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.metrics[name] = gaugeVecFunc{help: help, fn: fn}
}
