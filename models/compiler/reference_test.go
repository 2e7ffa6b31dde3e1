package compiler_test

import (
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
)

func TestQuantileEdges(t *testing.T) {
	seq := func(n int) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = float64(n - i) // unsorted on purpose
		}
		return v
	}
	nan := math.NaN()
	tests := []struct {
		name   string
		values []float64
		want   []float64
	}{
		{"deciles of 1..101", seq(101), []float64{11, 21, 31, 41, 51, 61, 71, 81, 91}},
		{"constant", []float64{3, 3, 3, 3}, []float64{3}},
		{"a flag: repeated edges dropped", []float64{0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1}, []float64{0, 1}},
		{"missing values ignored", []float64{nan, 1, nan, 2, nan}, []float64{1}},
		{"all missing", []float64{nan, nan}, []float64{}},
		{"infinities skipped", []float64{math.Inf(-1), 0, 0, 0, 0, 0, 0, 0, 0, 0, math.Inf(1)}, []float64{0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := compiler.QuantileEdges(tt.values); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("QuantileEdges = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestReferenceHistograms checks every example's and fixture's reference
// against a recount: the feature histograms count the sample's own values,
// the output histograms the compiled module's outputs on the sample, and
// the manifest passes bundle validation.
func TestReferenceHistograms(t *testing.T) {
	for _, dir := range specDirs(t) {
		spec, err := compiler.ReadSpec(dir)
		if err != nil {
			t.Fatal(err)
		}
		if spec.Reference == "" {
			continue
		}
		t.Run(spec.Name, func(t *testing.T) {
			res, err := spec.Build()
			if err != nil {
				t.Fatal(err)
			}
			ref := res.Bundle.Manifest.Reference
			m, _ := spec.Load()
			o, _ := spec.Options()
			rows, err := o.Reference.Select(m.Features)
			if err != nil {
				t.Fatal(err)
			}
			if ref == nil || ref.Rows != uint64(len(rows)) || len(ref.Features) != len(m.Features) || len(ref.Outputs) != len(m.Columns()) {
				t.Fatalf("reference %+v for %d rows, %d features, %d output columns", ref, len(rows), len(m.Features), len(m.Columns()))
			}
			for j, h := range ref.Features {
				if h.Name != m.Features[j] {
					t.Fatalf("feature histogram %d is %q, want %q", j, h.Name, m.Features[j])
				}
				want := make([]uint64, len(h.Counts))
				for _, r := range rows {
					if b := bundle.Bucket(h.Edges, float64(r[j])); b >= 0 {
						want[b]++
					}
				}
				if !reflect.DeepEqual(h.Counts, want) {
					t.Fatalf("%s: counts %v, recount %v", h.Name, h.Counts, want)
				}
			}
			p := m.NewPredictor()
			out := make([]float32, len(m.Columns()))
			want := make([][]uint64, len(ref.Outputs))
			for k := range want {
				want[k] = make([]uint64, len(ref.Outputs[k].Counts))
			}
			for _, r := range rows {
				p.Predict(r, out)
				for k, h := range ref.Outputs {
					if b := bundle.Bucket(h.Edges, float64(out[k])); b >= 0 {
						want[k][b]++
					}
				}
			}
			for k, h := range ref.Outputs {
				if !reflect.DeepEqual(h.Counts, want[k]) || h.Total() != ref.Rows {
					t.Fatalf("%s: counts %v, recount %v (of %d rows)", h.Name, h.Counts, want[k], ref.Rows)
				}
			}
		})
	}
}

func TestDefaultLabels(t *testing.T) {
	tests := []struct {
		dir  string
		want string
	}{
		{"testdata/fixtures/xgb-wine", "0,1,2"},                           // multi:softprob: XGBoost's class ids
		{"testdata/fixtures/xgb-diabetes", ""},                            // regression
		{"testdata/fixtures/onnx-logreg-wine", "class_0,class_1,class_2"}, // from the ONNX file
		{"../examples/breast-cancer-risk", "0,1"},                         // binary:logistic
	}
	for _, tt := range tests {
		spec, err := compiler.ReadSpec(tt.dir)
		if err != nil {
			t.Fatal(err)
		}
		m, err := spec.Load()
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(m.DefaultLabels(), ","); got != tt.want {
			t.Errorf("%s: DefaultLabels = %q, want %q", tt.dir, got, tt.want)
		}
		// With no labels given, the bundle carries the defaults; a spec's
		// labels override them.
		res, err := compiler.Compile(m, compiler.Options{Name: "labels", Version: "1.0.0"})
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(res.Bundle.Manifest.Labels, ","); got != tt.want {
			t.Errorf("%s: manifest labels %q, want %q", tt.dir, got, tt.want)
		}
		if spec.Labels != nil {
			res, err := spec.Build()
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(res.Bundle.Manifest.Labels, spec.Labels) {
				t.Errorf("%s: manifest labels %v, spec says %v", tt.dir, res.Bundle.Manifest.Labels, spec.Labels)
			}
		}
	}
}
