// Package summary merges inference aggregates and derives the figures
// people and rollout gates read from them: counts, error rates, latency
// quantiles from histograms, and drift (PSI and Jensen–Shannon) of a
// histogram against a model's reference.
//
// Histograms follow the wire contract (edgefleet.v1.Histogram): ascending
// inner bounds, len(bounds)+1 counts, counts[0] below the first bound and
// the last count at or above the last bound. Two histograms with the same
// bounds merge exactly by adding counts; the controller never needs
// anything but sums, so aggregates of any devices, minutes and cohorts
// merge in any order.
package summary

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// LatencyBounds are the inner bucket edges, in microseconds, of the
// latency histograms the controller builds from per-inference records:
// 1 µs to about 100 s, each bucket about 10 % wider than the one before, so
// a quantile read from them is within 10 % of the exact one, and a minute
// of one device costs at most a few hundred counts.
var LatencyBounds = latencyBounds()

func latencyBounds() []float64 {
	var out []float64
	for v := 1.0; v < 100e6; v *= 1.1 {
		b := math.Round(v)
		if len(out) == 0 || b > out[len(out)-1] {
			out = append(out, b)
		}
	}
	return out
}

// NewLatency returns an empty histogram on LatencyBounds.
func NewLatency() *pb.Histogram {
	return &pb.Histogram{Bounds: LatencyBounds, Counts: make([]uint64, len(LatencyBounds)+1)}
}

// Bucket returns the index of the bucket v falls in.
func Bucket(bounds []float64, v float64) int {
	// The first bound above v; equal goes up (bounds[i-1] <= v < bounds[i]).
	i, found := slices.BinarySearch(bounds, v)
	if found {
		i++
	}
	return i
}

// Observe counts n values of v into h.
func Observe(h *pb.Histogram, v float64, n uint64) {
	h.Counts[Bucket(h.Bounds, v)] += n
}

// ErrBounds is returned for histograms whose bounds or counts do not fit
// together.
var ErrBounds = errors.New("histogram bounds do not match")

// Check reports whether h is well formed: ascending bounds and one count
// more than bounds.
func Check(h *pb.Histogram) error {
	if len(h.GetCounts()) != len(h.GetBounds())+1 {
		return fmt.Errorf("%w: %d bounds need %d counts, have %d", ErrBounds, len(h.GetBounds()), len(h.GetBounds())+1, len(h.GetCounts()))
	}
	for i := 1; i < len(h.GetBounds()); i++ {
		if !(h.Bounds[i] > h.Bounds[i-1]) {
			return fmt.Errorf("%w: bounds are not strictly ascending at %d", ErrBounds, i)
		}
	}
	return nil
}

// Merge adds src's counts into dst. With the same bounds this is exact.
// With other bounds (an agent that changed its latency buckets between
// versions), each of src's buckets is counted at its lower edge into dst's
// buckets: approximate, but it never loses a count. An empty dst takes
// src's bounds.
func Merge(dst, src *pb.Histogram) error {
	if src == nil || len(src.GetCounts()) == 0 {
		return nil
	}
	if err := Check(src); err != nil {
		return err
	}
	if len(dst.Counts) == 0 {
		dst.Bounds = slices.Clone(src.Bounds)
		dst.Counts = slices.Clone(src.Counts)
		return nil
	}
	if slices.Equal(dst.Bounds, src.Bounds) {
		for i, c := range src.Counts {
			dst.Counts[i] += c
		}
		return nil
	}
	for i, c := range src.Counts {
		if c == 0 {
			continue
		}
		v := math.Inf(-1)
		if i > 0 {
			v = src.Bounds[i-1]
		}
		dst.Counts[Bucket(dst.Bounds, v)] += c
	}
	return nil
}

// Total returns the sum of h's counts.
func Total(h *pb.Histogram) uint64 {
	var n uint64
	for _, c := range h.GetCounts() {
		n += c
	}
	return n
}

// Quantile returns the q-quantile (0 < q <= 1) of h by nearest rank,
// interpolated linearly inside the bucket the rank falls in. Values below
// the first bound read as the first bound, values at or above the last
// bound as the last bound: the open-ended buckets have no width to
// interpolate over. An empty histogram gives 0.
func Quantile(h *pb.Histogram, q float64) float64 {
	n := Total(h)
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	rank = min(max(rank, 1), n)
	var seen uint64
	for i, c := range h.Counts {
		if seen+c < rank {
			seen += c
			continue
		}
		switch {
		case len(h.Bounds) == 0:
			return 0
		case i == 0:
			return h.Bounds[0]
		case i == len(h.Bounds):
			return h.Bounds[i-1]
		}
		lo, hi := h.Bounds[i-1], h.Bounds[i]
		return lo + (hi-lo)*float64(rank-seen)/float64(c)
	}
	return h.Bounds[len(h.Bounds)-1]
}

// Midpoint is the value that stands for bucket i of bounds when single
// values are read back from counts: the middle of an inner bucket, the
// nearest bound for the two open-ended ones (as in Quantile).
func Midpoint(bounds []float64, i int) float64 {
	switch {
	case len(bounds) == 0:
		return 0
	case i <= 0:
		return bounds[0]
	case i >= len(bounds):
		return bounds[len(bounds)-1]
	}
	return (bounds[i-1] + bounds[i]) / 2
}

// MergeAggregate adds src into dst: counts, errors, timeouts, latency,
// each output and feature histogram by name, data-quality counters. dst
// keeps its identity fields (slot, model, version, interval).
func MergeAggregate(dst, src *pb.InferenceAggregate) error {
	dst.Count += src.GetCount()
	dst.Errors += src.GetErrors()
	dst.Timeouts += src.GetTimeouts()
	dst.NanValues += src.GetNanValues()
	dst.OutOfRangeValues += src.GetOutOfRangeValues()
	if src.GetLatencyUs() != nil {
		if dst.LatencyUs == nil {
			dst.LatencyUs = &pb.Histogram{}
		}
		if err := Merge(dst.LatencyUs, src.LatencyUs); err != nil {
			return fmt.Errorf("latency: %w", err)
		}
	}
	var err error
	if dst.Outputs, err = mergeNamed(dst.Outputs, src.GetOutputs()); err != nil {
		return fmt.Errorf("outputs: %w", err)
	}
	if dst.Features, err = mergeNamed(dst.Features, src.GetFeatures()); err != nil {
		return fmt.Errorf("features: %w", err)
	}
	return nil
}

func mergeNamed(dst, src []*pb.NamedHistogram) ([]*pb.NamedHistogram, error) {
	for _, s := range src {
		i := slices.IndexFunc(dst, func(d *pb.NamedHistogram) bool { return d.GetName() == s.GetName() })
		if i < 0 {
			dst = append(dst, &pb.NamedHistogram{Name: s.GetName(), Histogram: &pb.Histogram{}})
			i = len(dst) - 1
		}
		d := dst[i]
		d.Missing += s.GetMissing()
		if d.Histogram == nil {
			d.Histogram = &pb.Histogram{}
		}
		if err := Merge(d.Histogram, s.GetHistogram()); err != nil {
			return dst, fmt.Errorf("%s: %w", s.GetName(), err)
		}
	}
	return dst, nil
}

// Epsilon replaces the proportion of an empty bin in PSI, which is
// otherwise infinite (ln 0) for a bin the reference or the observation
// never saw. 1e-4 is the customary choice: one empty bin against a bin
// holding 10 % adds (0.1-0.0001)·ln(0.1/0.0001) ≈ 0.69, well above any
// threshold, so a new bin still registers as drift.
const Epsilon = 1e-4

// PSI returns the population stability index of observed against
// reference counts (same bins): Σ (o_i − r_i)·ln(o_i / r_i) over the
// proportions, an empty bin's proportion taken as Epsilon (not
// renormalised). Either side empty gives 0.
func PSI(reference, observed []uint64) (float64, error) {
	r, o, ok, err := proportions(reference, observed)
	if !ok || err != nil {
		return 0, err
	}
	var psi float64
	for i := range r {
		ri, oi := max(r[i], Epsilon), max(o[i], Epsilon)
		psi += (oi - ri) * math.Log(oi/ri)
	}
	return psi, nil
}

// JS returns the Jensen–Shannon divergence of observed and reference
// counts (same bins), with base-2 logarithms, so it lies in [0, 1]: 0 for
// equal distributions, 1 for disjoint ones. It needs no epsilon: a term
// with p = 0 is 0, and the mixture is positive wherever p is.
func JS(reference, observed []uint64) (float64, error) {
	r, o, ok, err := proportions(reference, observed)
	if !ok || err != nil {
		return 0, err
	}
	var js float64
	for i := range r {
		m := (r[i] + o[i]) / 2
		if r[i] > 0 {
			js += r[i] / 2 * math.Log2(r[i]/m)
		}
		if o[i] > 0 {
			js += o[i] / 2 * math.Log2(o[i]/m)
		}
	}
	return max(js, 0), nil
}

func proportions(reference, observed []uint64) (r, o []float64, ok bool, err error) {
	if len(reference) != len(observed) {
		return nil, nil, false, fmt.Errorf("%w: reference has %d bins, observed %d", ErrBounds, len(reference), len(observed))
	}
	var nr, no uint64
	for i := range reference {
		nr += reference[i]
		no += observed[i]
	}
	if nr == 0 || no == 0 {
		return nil, nil, false, nil
	}
	r, o = make([]float64, len(reference)), make([]float64, len(observed))
	for i := range reference {
		r[i] = float64(reference[i]) / float64(nr)
		o[i] = float64(observed[i]) / float64(no)
	}
	return r, o, true, nil
}

// IsTimeout tells a timeout from other errors in an inference record's
// error text; the agent's runtime says "timed out" (models/host.ErrTimeout).
func IsTimeout(e string) bool {
	e = strings.ToLower(e)
	return strings.Contains(e, "timed out") || strings.Contains(e, "deadline exceeded") || strings.Contains(e, "timeout")
}

// MaxHistogramBins caps the bins of one histogram an agent may send.
const MaxHistogramBins = 4096

// MaxNamedHistograms caps the outputs or features of one aggregate.
const MaxNamedHistograms = 1024

// CheckAggregate reports whether an agent's aggregate is well formed and
// within the caps: every histogram's counts fit its bounds.
func CheckAggregate(a *pb.InferenceAggregate) error {
	if a.GetErrors() > a.GetCount() || a.GetTimeouts() > a.GetErrors() {
		return fmt.Errorf("aggregate of %s@%s: %d errors and %d timeouts in %d inferences", a.GetModel(), a.GetVersion(), a.GetErrors(), a.GetTimeouts(), a.GetCount())
	}
	check := func(what string, h *pb.Histogram) error {
		if h == nil {
			return nil
		}
		if len(h.GetCounts()) > MaxHistogramBins {
			return fmt.Errorf("aggregate of %s@%s: %s has %d bins; the limit is %d", a.GetModel(), a.GetVersion(), what, len(h.GetCounts()), MaxHistogramBins)
		}
		if err := Check(h); err != nil {
			return fmt.Errorf("aggregate of %s@%s: %s: %w", a.GetModel(), a.GetVersion(), what, err)
		}
		return nil
	}
	if err := check("latency", a.GetLatencyUs()); err != nil {
		return err
	}
	if len(a.GetOutputs()) > MaxNamedHistograms || len(a.GetFeatures()) > MaxNamedHistograms {
		return fmt.Errorf("aggregate of %s@%s: %d outputs and %d features; the limit is %d each", a.GetModel(), a.GetVersion(), len(a.GetOutputs()), len(a.GetFeatures()), MaxNamedHistograms)
	}
	for _, n := range append(slices.Clip(a.GetOutputs()), a.GetFeatures()...) {
		if err := check(n.GetName(), n.GetHistogram()); err != nil {
			return err
		}
	}
	return nil
}
