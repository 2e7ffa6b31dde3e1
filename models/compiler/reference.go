package compiler

import (
	"fmt"
	"math"
	"sort"

	"github.com/edgefleet/edgefleet/models/bundle"
)

// ReferenceBins is the number of buckets a quantile histogram aims at:
// its inner edges are the sample's deciles.
const ReferenceBins = 10

// ProbabilityEdges are the fixed inner edges of the histograms of
// probability outputs (sigmoid or softmax): tenths.
var ProbabilityEdges = []float64{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}

// NewReference computes the drift reference of m (bundle.Reference) from a
// sample of inputs:
//
//   - per feature, quantile buckets: the inner edges are the sample's
//     deciles (the values at ranks i*(n-1)/10 of the sorted present values,
//     i = 1..9), with repeated values dropped, so a feature with few
//     distinct values (a flag, a count) gets fewer, wider buckets rather
//     than empty ones;
//   - per output column, the model's own outputs on the sample, computed
//     by the native evaluator that computes what the module computes
//     (within 1e-5): probabilities on the fixed tenths ProbabilityEdges,
//     anything else (regression) on the deciles of those outputs.
//
// Missing values are counted in no bucket (bundle.Reference says so).
func NewReference(m *Model, sample *Table) (*bundle.Reference, error) {
	rows, err := sample.Select(m.Features)
	if err != nil {
		return nil, fmt.Errorf("reference sample: %w", err)
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("reference sample %s has no rows; give a CSV of typical inputs, one row per line", sample.Source)
	}
	ref := &bundle.Reference{Rows: uint64(len(rows))}
	col := make([]float64, len(rows))
	for j, name := range m.Features {
		for r, row := range rows {
			col[r] = float64(row[j])
		}
		ref.Features = append(ref.Features, histogram(name, col, nil))
	}
	cols := m.Columns()
	outs := make([][]float32, len(rows))
	p := m.NewPredictor()
	for r, row := range rows {
		outs[r] = make([]float32, len(cols))
		p.Predict(row, outs[r])
	}
	c := 0
	for _, o := range m.Outputs {
		var edges []float64
		if o.Probability {
			edges = ProbabilityEdges
		}
		for k := 0; k < o.Width; k++ {
			for r := range rows {
				col[r] = float64(outs[r][c])
			}
			ref.Outputs = append(ref.Outputs, histogram(cols[c], col, edges))
			c++
		}
	}
	return ref, nil
}

// QuantileEdges returns the inner edges of a quantile histogram of values
// (see NewReference): finite, strictly ascending, at most ReferenceBins-1.
// NaN values are ignored.
func QuantileEdges(values []float64) []float64 {
	sorted := make([]float64, 0, len(values))
	for _, v := range values {
		if !math.IsNaN(v) {
			sorted = append(sorted, v)
		}
	}
	sort.Float64s(sorted)
	edges := []float64{}
	for i := 1; i < ReferenceBins && len(sorted) > 0; i++ {
		e := sorted[i*(len(sorted)-1)/ReferenceBins]
		if math.IsInf(e, 0) {
			continue
		}
		if n := len(edges); n == 0 || e > edges[n-1] {
			edges = append(edges, e)
		}
	}
	return edges
}

// histogram counts values on edges, or on their quantile edges when edges
// is nil.
func histogram(name string, values []float64, edges []float64) bundle.RefHistogram {
	if edges == nil {
		edges = QuantileEdges(values)
	}
	h := bundle.RefHistogram{Name: name, Edges: append([]float64{}, edges...), Counts: make([]uint64, len(edges)+1)}
	for _, v := range values {
		if b := bundle.Bucket(h.Edges, v); b >= 0 {
			h.Counts[b]++
		}
	}
	return h
}
