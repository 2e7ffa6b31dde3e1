package bundle

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// Caps on the class labels and the reference histograms of a manifest.
// manifest.json as a whole is capped at MaxManifestSize; these keep one
// field from using all of it and keep a device's per-inference binning
// cheap.
const (
	MaxLabels        = 4096
	MaxLabelLen      = 256
	MaxRefHistograms = 4096
	MaxRefEdges      = 256
	maxRefNameLen    = 256
)

// Reference holds the histograms a deployed model's live inputs and outputs
// are compared with to measure drift (PSI, Jensen-Shannon). Devices count
// their live values on the same edges (Bucket), so the comparison is exact.
//
// Features[i] is the histogram of input column i: the i-th value of a row
// of the model's input ([-1, N] inputs; for several inputs, their columns
// in manifest order). Outputs are histograms of output columns, named as
// `fleet model predict` names them: the tensor's name for a [-1] or [-1, 1]
// output, "name[k]" for column k of a [-1, K] output. The bare name of a
// [-1, K] output is accepted too, for a histogram over the whole output
// (the top class, say).
//
// Missing values (NaN) are in no bucket: Rows minus the sum of a
// histogram's Counts is how many values of the sample were missing.
type Reference struct {
	// Rows is the number of sample rows the histograms count.
	Rows     uint64         `json:"rows"`
	Features []RefHistogram `json:"features,omitempty"`
	Outputs  []RefHistogram `json:"outputs,omitempty"`
}

// RefHistogram counts a sample's values of one column in the buckets cut by
// Edges: bucket 0 holds v < Edges[0], bucket i holds Edges[i-1] <= v <
// Edges[i], the last bucket v >= Edges[len(Edges)-1].
type RefHistogram struct {
	Name string `json:"name"`
	// Edges are the inner bucket edges, finite and strictly ascending.
	Edges []float64 `json:"edges"`
	// Counts has len(Edges)+1 buckets.
	Counts []uint64 `json:"counts"`
}

// Bucket returns the bucket of v on edges (see RefHistogram): the number of
// edges at or below v, found by binary search; -1 for NaN (a missing
// value), which belongs to no bucket. Agent and controller both bin with
// it, so their counts line up with the manifest's.
func Bucket(edges []float64, v float64) int {
	if v != v {
		return -1
	}
	return sort.Search(len(edges), func(i int) bool { return edges[i] > v })
}

// Bucket is the package function Bucket, for code that holds a Reference
// (a nil one too).
func (*Reference) Bucket(edges []float64, v float64) int { return Bucket(edges, v) }

// Bucket returns the bucket of v on h's edges (see the package function
// Bucket).
func (h *RefHistogram) Bucket(v float64) int { return Bucket(h.Edges, v) }

// Total is the number of values the histogram counts (missing ones
// excluded).
func (h *RefHistogram) Total() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// validateLabels checks the class labels against the first output: one
// label per column of a [-1, K] output, or one or two (negative, positive)
// for a single-column output. Outputs of other shapes are not checked
// against.
func (m *Manifest) validateLabels() error {
	if len(m.Labels) == 0 {
		return nil
	}
	if len(m.Labels) > MaxLabels {
		return fmt.Errorf("%w: manifest has %d labels; at most %d", ErrInvalid, len(m.Labels), MaxLabels)
	}
	seen := make(map[string]bool, len(m.Labels))
	for i, l := range m.Labels {
		if l == "" || len(l) > MaxLabelLen {
			return fmt.Errorf("%w: manifest label %d is %d bytes; use 1 to %d", ErrInvalid, i, len(l), MaxLabelLen)
		}
		if seen[l] {
			return fmt.Errorf("%w: manifest lists label %q twice; class labels must be distinct", ErrInvalid, l)
		}
		seen[l] = true
	}
	out := m.Outputs[0]
	w, ok := rowWidth(out.Shape)
	switch {
	case !ok:
	case w == 1 && len(m.Labels) <= 2:
	case w != len(m.Labels):
		return fmt.Errorf("%w: manifest has %d labels but output %q has %d columns; give one label per column (two, negative then positive, for a single probability)",
			ErrInvalid, len(m.Labels), out.Name, w)
	}
	return nil
}

// validateReference checks the reference histograms: sizes, edges, counts,
// and names against the manifest's inputs and outputs.
func (m *Manifest) validateReference() error {
	r := m.Reference
	if r == nil {
		return nil
	}
	if len(r.Features)+len(r.Outputs) > MaxRefHistograms {
		return fmt.Errorf("%w: manifest reference has %d histograms; at most %d", ErrInvalid, len(r.Features)+len(r.Outputs), MaxRefHistograms)
	}
	if len(r.Features) > 0 {
		if cols, ok := m.featureColumns(); ok && len(r.Features) != cols {
			return fmt.Errorf("%w: manifest reference has %d feature histograms but the inputs have %d columns; give one per input column, in order",
				ErrInvalid, len(r.Features), cols)
		}
	}
	columns := m.outputColumns()
	for _, set := range []struct {
		kind  string
		hists []RefHistogram
	}{{"feature", r.Features}, {"output", r.Outputs}} {
		seen := make(map[string]bool, len(set.hists))
		for i := range set.hists {
			h := &set.hists[i]
			if err := h.validate(r.Rows); err != nil {
				return fmt.Errorf("%w: manifest reference %s histogram %d (%q): %v", ErrInvalid, set.kind, i, truncate(h.Name), err)
			}
			if seen[h.Name] {
				return fmt.Errorf("%w: manifest reference lists %s histogram %q twice", ErrInvalid, set.kind, h.Name)
			}
			seen[h.Name] = true
			if set.kind == "output" && !columns[h.Name] {
				return fmt.Errorf("%w: manifest reference output histogram %q names no output column; use an output's name, or name[k] for column k of a [-1, K] output",
					ErrInvalid, truncate(h.Name))
			}
		}
	}
	return nil
}

func (h *RefHistogram) validate(rows uint64) error {
	if h.Name == "" || len(h.Name) > maxRefNameLen {
		return fmt.Errorf("name is %d bytes; use 1 to %d", len(h.Name), maxRefNameLen)
	}
	if len(h.Edges) > MaxRefEdges {
		return fmt.Errorf("%d edges; at most %d", len(h.Edges), MaxRefEdges)
	}
	for i, e := range h.Edges {
		if math.IsNaN(e) || math.IsInf(e, 0) {
			return fmt.Errorf("edge %d is %v; edges must be finite", i, e)
		}
		if i > 0 && !(e > h.Edges[i-1]) {
			return fmt.Errorf("edges %v and %v are not strictly ascending", h.Edges[i-1], e)
		}
	}
	if len(h.Counts) != len(h.Edges)+1 {
		return fmt.Errorf("%d counts for %d edges; want len(edges)+1 = %d", len(h.Counts), len(h.Edges), len(h.Edges)+1)
	}
	var total uint64
	for _, c := range h.Counts {
		if total+c < total {
			return fmt.Errorf("counts overflow")
		}
		total += c
	}
	if total > rows {
		return fmt.Errorf("counts add up to %d, more than the reference's %d rows", total, rows)
	}
	return nil
}

// featureColumns is the number of input columns per row, when every input
// has shape [-1] or [-1, N].
func (m *Manifest) featureColumns() (int, bool) {
	n := 0
	for _, in := range m.Inputs {
		w, ok := rowWidth(in.Shape)
		if !ok {
			return 0, false
		}
		n += w
	}
	return n, true
}

// outputColumns is the set of names an output histogram may have: every
// output's name, and name[k] for each column of a [-1, K] output.
func (m *Manifest) outputColumns() map[string]bool {
	cols := map[string]bool{}
	for _, o := range m.Outputs {
		cols[o.Name] = true
		if w, ok := rowWidth(o.Shape); ok && len(o.Shape) == 2 {
			for k := 0; k < w; k++ {
				cols[o.Name+"["+strconv.Itoa(k)+"]"] = true
			}
		}
	}
	return cols
}

// rowWidth is the number of values per row of a [-1] or [-1, N] tensor
// (N at most MaxRefHistograms, so a huge declared width is not expanded).
func rowWidth(shape []int64) (int, bool) {
	switch {
	case len(shape) == 1 && shape[0] == -1:
		return 1, true
	case len(shape) == 2 && shape[0] == -1 && shape[1] > 0 && shape[1] <= MaxRefHistograms:
		return int(shape[1]), true
	}
	return 0, false
}

// truncate shortens a name for an error message.
func truncate(s string) string {
	if len(s) <= 64 {
		return s
	}
	return strings.ToValidUTF8(s[:64], "") + "..."
}
