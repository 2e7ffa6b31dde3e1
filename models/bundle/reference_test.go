package bundle

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

// classifier is a manifest of a two-class model with labels and a reference.
func classifier() Manifest {
	m := manifest()
	m.Inputs = []TensorSpec{{Name: "input", Datatype: "FP32", Shape: []int64{-1, 2}}}
	m.Outputs = []TensorSpec{{Name: "probabilities", Datatype: "FP32", Shape: []int64{-1, 2}}}
	m.Tests = nil
	m.Labels = []string{"benign", "malignant"}
	m.Reference = &Reference{
		Rows: 10,
		Features: []RefHistogram{
			{Name: "radius", Edges: []float64{1, 2.5}, Counts: []uint64{3, 4, 3}},
			{Name: "texture", Edges: []float64{0}, Counts: []uint64{5, 4}}, // one missing
		},
		Outputs: []RefHistogram{
			{Name: "probabilities[0]", Edges: []float64{0.5}, Counts: []uint64{4, 6}},
			{Name: "probabilities[1]", Edges: []float64{0.5}, Counts: []uint64{6, 4}},
		},
	}
	return m
}

func TestReferenceRoundTrip(t *testing.T) {
	b, err := New(classifier(), module)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"labels": [`, `"reference": {`, `"rows": 10`, `"features": [`, `"edges": [`, `"counts": [`} {
		if !strings.Contains(string(b.ManifestJSON), want) {
			t.Errorf("manifest.json lacks %s:\n%s", want, b.ManifestJSON)
		}
	}
	enc, _ := b.Encode()
	dec, err := Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(dec.Manifest.Reference, b.Manifest.Reference) || !reflect.DeepEqual(dec.Manifest.Labels, b.Manifest.Labels) {
		t.Fatalf("reference or labels differ after a round trip:\n%+v\n%+v", dec.Manifest, b.Manifest)
	}
	if got := dec.Manifest.Reference.Features[1].Total(); got != 9 {
		t.Fatalf("Total = %d, want 9", got)
	}
	// Older manifests have neither field.
	plain, _ := New(manifest(), module)
	if strings.Contains(string(plain.ManifestJSON), "reference") || strings.Contains(string(plain.ManifestJSON), "labels") {
		t.Fatalf("empty fields are written:\n%s", plain.ManifestJSON)
	}
}

func TestReferenceRefusals(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Manifest)
		want   string
	}{
		{"empty label", func(m *Manifest) { m.Labels[1] = "" }, "label 1"},
		{"duplicate label", func(m *Manifest) { m.Labels[1] = m.Labels[0] }, "twice"},
		{"too many labels", func(m *Manifest) { m.Labels = append(m.Labels, "other") }, "3 labels but output \"probabilities\" has 2 columns"},
		{"label too long", func(m *Manifest) { m.Labels[0] = strings.Repeat("x", MaxLabelLen+1) }, "label 0"},
		{"descending edges", func(m *Manifest) { m.Reference.Features[0].Edges = []float64{2.5, 1} }, "not strictly ascending"},
		{"repeated edge", func(m *Manifest) { m.Reference.Features[0].Edges = []float64{1, 1} }, "not strictly ascending"},
		{"infinite edge", func(m *Manifest) { m.Reference.Features[0].Edges[1] = math.Inf(1) }, "finite"},
		{"counts length", func(m *Manifest) { m.Reference.Features[0].Counts = []uint64{3, 4} }, "want len(edges)+1 = 3"},
		{"counts over rows", func(m *Manifest) { m.Reference.Features[0].Counts[0] = 30 }, "more than the reference's 10 rows"},
		{"counts overflow", func(m *Manifest) { m.Reference.Features[0].Counts = []uint64{math.MaxUint64, 1, 0} }, "overflow"},
		{"too many edges", func(m *Manifest) {
			h := &m.Reference.Features[0]
			h.Edges = make([]float64, MaxRefEdges+1)
			for i := range h.Edges {
				h.Edges[i] = float64(i)
			}
			h.Counts = make([]uint64, len(h.Edges)+1)
		}, "at most"},
		{"unnamed histogram", func(m *Manifest) { m.Reference.Features[0].Name = "" }, "name is 0 bytes"},
		{"duplicate feature", func(m *Manifest) { m.Reference.Features[1].Name = "radius" }, "twice"},
		{"feature count", func(m *Manifest) { m.Reference.Features = m.Reference.Features[:1] }, "1 feature histograms but the inputs have 2 columns"},
		{"unknown output", func(m *Manifest) { m.Reference.Outputs[0].Name = "score" }, "names no output column"},
		{"output column out of range", func(m *Manifest) { m.Reference.Outputs[0].Name = "probabilities[2]" }, "names no output column"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := classifier()
			tt.change(&m)
			_, err := New(m, module)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrInvalid containing %q", err, tt.want)
			}
		})
	}
	// What is allowed: a single probability with two labels, a histogram of
	// a whole one-column output, no feature histograms.
	m := classifier()
	m.Outputs = []TensorSpec{{Name: "probability", Datatype: "FP32", Shape: []int64{-1}}}
	m.Reference.Outputs = []RefHistogram{{Name: "probability", Edges: []float64{0.1, 0.9}, Counts: []uint64{1, 2, 3}}}
	m.Reference.Features = nil
	if _, err := New(m, module); err != nil {
		t.Fatal(err)
	}
}

func TestBucket(t *testing.T) {
	edges := []float64{-1, 0, 2.5}
	tests := []struct {
		v    float64
		want int
	}{
		{math.Inf(-1), 0}, {-5, 0}, {-1, 1}, {-0.5, 1}, {0, 2}, {2.4999, 2}, {2.5, 3}, {1e300, 3}, {math.Inf(1), 3}, {math.NaN(), -1},
	}
	for _, tt := range tests {
		if got := Bucket(edges, tt.v); got != tt.want {
			t.Errorf("Bucket(%v, %v) = %d, want %d", edges, tt.v, got, tt.want)
		}
	}
	if got := Bucket(nil, 3); got != 0 {
		t.Errorf("Bucket(nil, 3) = %d, want 0", got)
	}
	h := RefHistogram{Edges: edges}
	if got := h.Bucket(1); got != 2 {
		t.Errorf("RefHistogram.Bucket(1) = %d, want 2", got)
	}
	var ref *Reference
	if got := ref.Bucket(edges, -7); got != 0 {
		t.Errorf("Reference.Bucket(-7) = %d, want 0", got)
	}
	// Against a linear scan, over many values.
	for v := -3.0; v < 4; v += 0.125 {
		want := 0
		for _, e := range edges {
			if v >= e {
				want++
			}
		}
		if got := Bucket(edges, v); got != want {
			t.Fatalf("Bucket(%v) = %d, linear scan says %d", v, got, want)
		}
	}
}
