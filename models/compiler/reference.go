package compiler

import (
	"fmt"
	"math"
	"sort"
)

// Reference holds the histograms a deployed model's inputs and outputs are
// compared with to measure drift (PSI, Jensen-Shannon). Devices bin their
// live data on the same edges, so the comparison is exact.
type Reference struct {
	// Rows is the number of sample rows the histograms count.
	Rows int `json:"rows"`
	// Inputs has one histogram per feature, Outputs one per output column.
	Inputs  []Histogram `json:"inputs"`
	Outputs []Histogram `json:"outputs"`
}

// Histogram counts values in the bins cut by Edges: bin 0 holds x <
// Edges[0], bin i holds Edges[i-1] <= x < Edges[i], the last bin x >=
// Edges[len-1]. Missing values are counted apart.
type Histogram struct {
	Name    string    `json:"name"`
	Edges   []float64 `json:"edges"`
	Counts  []int64   `json:"counts"`
	Missing int64     `json:"missing,omitempty"`
}

// referenceBins is the number of bins of a quantile histogram.
const referenceBins = 10

// probabilityEdges are the fixed edges of probability outputs.
var probabilityEdges = []float64{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}

// NewReference computes the reference histograms of m from a sample of
// inputs: per feature, decile bins of the sample; per output column, the
// model's outputs on the sample (computed natively), binned on fixed
// tenths for probabilities and on deciles otherwise.
func NewReference(m *Model, sample *Table) (*Reference, error) {
	rows, err := sample.Select(m.Features)
	if err != nil {
		return nil, fmt.Errorf("reference sample: %w", err)
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("reference sample %s has no rows", sample.Source)
	}
	ref := &Reference{Rows: len(rows)}
	col := make([]float64, len(rows))
	for j, name := range m.Features {
		for r, row := range rows {
			col[r] = float64(row[j])
		}
		ref.Inputs = append(ref.Inputs, histogram(name, col, nil))
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
			edges = probabilityEdges
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

// histogram bins values on edges, or on the deciles of the values when
// edges is nil.
func histogram(name string, values []float64, edges []float64) Histogram {
	h := Histogram{Name: name}
	present := make([]float64, 0, len(values))
	for _, v := range values {
		if math.IsNaN(v) {
			h.Missing++
		} else {
			present = append(present, v)
		}
	}
	if edges == nil {
		sorted := append([]float64(nil), present...)
		sort.Float64s(sorted)
		for i := 1; i < referenceBins && len(sorted) > 0; i++ {
			e := sorted[i*(len(sorted)-1)/referenceBins]
			if math.IsInf(e, 0) {
				continue
			}
			if n := len(edges); n == 0 || e > edges[n-1] {
				edges = append(edges, e)
			}
		}
	}
	h.Edges = append([]float64{}, edges...)
	h.Counts = make([]int64, len(edges)+1)
	for _, v := range present {
		// bin = number of edges <= v
		h.Counts[sort.Search(len(edges), func(i int) bool { return edges[i] > v })]++
	}
	return h
}
