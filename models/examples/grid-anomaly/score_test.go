package main

import (
	"encoding/json"
	"flag"
	"math"
	"math/rand/v2"
	"os"
	"reflect"
	"testing"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/tensor"
)

var update = flag.Bool("update", false, "rewrite golden-<version>.json from the native formula")

// goldenRows are the readings of the golden vectors: nominal, a voltage
// sag with overcurrent, and a frequency excursion with overheating.
var goldenRows = [][]float64{
	{230, 10, 50, 35},
	{207, 18, 49.9, 42},
	{236, 12, 49.6, 61},
}

// goldenCases are the vectors of a golden file: one row each, then all
// rows as one batch.
func goldenCases() [][][]float64 {
	var cases [][][]float64
	for _, r := range goldenRows {
		cases = append(cases, [][]float64{r})
	}
	return append(cases, goldenRows)
}

// expected computes the golden file of a version natively. Readings pass
// through float32 first, as they do on the wire, and scores are rounded to
// float32, as the model outputs them.
func expected(t *testing.T, version string) build.Golden {
	t.Helper()
	c, err := CalibrationFor(version)
	if err != nil {
		t.Fatal(err)
	}
	var g build.Golden
	for _, rows := range goldenCases() {
		var in, out []float64
		for _, r := range rows {
			f := make([]float64, 4)
			for i := range r {
				f[i] = float64(float32(r[i]))
			}
			in = append(in, f...)
			out = append(out, float64(float32(c.Score(f[0], f[1], f[2], f[3]))))
		}
		n := int64(len(rows))
		g.Tests = append(g.Tests, bundle.TestVector{
			Inputs:    []bundle.TensorValue{{Name: "readings", Datatype: "FP32", Shape: []int64{n, 4}, Data: in}},
			Outputs:   []bundle.TensorValue{{Name: "score", Datatype: "FP32", Shape: []int64{n}, Data: out}},
			Tolerance: 1e-5,
		})
	}
	g.Reference = reference(c)
	return g
}

// referenceRows is the size of the reference sample.
const referenceRows = 1000

// reference computes a version's drift reference from a synthetic sample
// of healthy grid readings: volts N(230, 3), amps N(10, 1), hertz N(50,
// 0.05), degrees C N(35, 4), and one row in twenty a voltage swell of +40 V
// (what `make run` sends). Features are binned on the sample's deciles,
// the score on tenths, as the model compiler does (models/compiler).
func reference(c Calibration) *bundle.Reference {
	rng := rand.New(rand.NewPCG(7, 11))
	cols := make([][]float64, 4)
	var scores []float64
	for range referenceRows {
		r := []float64{230 + rng.NormFloat64()*3, 10 + rng.NormFloat64(), 50 + rng.NormFloat64()*0.05, 35 + rng.NormFloat64()*4}
		if rng.IntN(20) == 0 {
			r[0] += 40
		}
		for i := range r {
			r[i] = float64(float32(r[i]))
			cols[i] = append(cols[i], r[i])
		}
		scores = append(scores, float64(float32(c.Score(r[0], r[1], r[2], r[3]))))
	}
	ref := &bundle.Reference{Rows: referenceRows}
	for i, name := range []string{"volts", "amps", "hertz", "tempC"} {
		ref.Features = append(ref.Features, histogram(name, cols[i], compiler.QuantileEdges(cols[i])))
	}
	ref.Outputs = []bundle.RefHistogram{histogram("score", scores, compiler.ProbabilityEdges)}
	return ref
}

func histogram(name string, values, edges []float64) bundle.RefHistogram {
	h := bundle.RefHistogram{Name: name, Edges: edges, Counts: make([]uint64, len(edges)+1)}
	for _, v := range values {
		h.Counts[bundle.Bucket(edges, v)]++
	}
	return h
}

func TestGoldenFiles(t *testing.T) {
	for _, version := range []string{"1.0.0", "1.1.0"} {
		t.Run(version, func(t *testing.T) {
			want := expected(t, version)
			path := "golden-" + version + ".json"
			if *update {
				data, err := json.MarshalIndent(want, "", "  ")
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := build.ReadGolden(".", version)
			if err != nil {
				t.Fatalf("%v (run go test -update here to write it)", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("%s disagrees with the formula; run go test -update here if the formula changed on purpose", path)
			}
		})
	}
}

// TestVersionsDiffer guards the rollout demo: 1.1.0 must score the same
// readings observably differently from 1.0.0.
func TestVersionsDiffer(t *testing.T) {
	a, b := expected(t, "1.0.0"), expected(t, "1.1.0")
	last := len(a.Tests) - 1
	diff := 0.0
	for i, x := range a.Tests[last].Outputs[0].Data {
		diff = math.Max(diff, math.Abs(x-b.Tests[last].Outputs[0].Data[i]))
	}
	if diff < 0.05 {
		t.Fatalf("versions differ by at most %v on the golden rows; recalibrate so a rollout shows", diff)
	}
}

func TestScore(t *testing.T) {
	c, _ := CalibrationFor("1.0.0")
	tests := []struct {
		name                   string
		volts, amps, hz, tempC float64
		min, max               float64
	}{
		{"nominal", 230, 10, 50, 25, 0, 0.05},
		{"current below rating counts nothing", 230, 15.9, 50, 25, 0, 0.05},
		{"at the midpoint", 253, 0, 50, 25, 0.49, 0.51}, // one scale of volts = distance 1
		{"severe sag", 150, 10, 50, 25, 0.99, 1},
		{"frequency collapse", 230, 10, 48, 25, 0.99, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := c.Score(tt.volts, tt.amps, tt.hz, tt.tempC)
			if s < tt.min || s > tt.max {
				t.Fatalf("score %v, want in [%v, %v]", s, tt.min, tt.max)
			}
		})
	}
	if _, err := CalibrationFor("9.9.9"); err == nil {
		t.Fatal("unknown version accepted")
	}
}

func TestInfer(t *testing.T) {
	c, _ := CalibrationFor("1.1.0")
	in := tensor.FromFloat32("readings", []int64{2, 4}, []float32{230, 10, 50, 25, 207, 18, 49.9, 42})
	out, err := infer(c, []tensor.Tensor{in})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := out[0].Float32s()
	if len(got) != 2 || !reflect.DeepEqual(out[0].Shape, []int64{2}) {
		t.Fatalf("got %v shape %v", got, out[0].Shape)
	}
	if want := float32(c.Score(207, 18, float64(float32(49.9)), 42)); got[1] != want {
		t.Fatalf("row 1 scored %v, want %v", got[1], want)
	}
	bad := tensor.FromFloat32("readings", []int64{1, 4}, []float32{230, float32(math.NaN()), 50, 25})
	if _, err := infer(c, []tensor.Tensor{bad}); err == nil {
		t.Fatal("NaN reading accepted")
	}
}

// TestModelJSON keeps model.json and the Go declarations in step.
func TestModelJSON(t *testing.T) {
	mi, err := build.ReadModelInfo(".")
	if err != nil {
		t.Fatal(err)
	}
	if mi.Name != Name {
		t.Fatalf("model.json name %q, Go says %q", mi.Name, Name)
	}
	conv := func(ss []bundle.TensorSpec) []tensor.Spec {
		var out []tensor.Spec
		for _, s := range ss {
			out = append(out, tensor.Spec{Name: s.Name, Datatype: s.Datatype, Shape: s.Shape})
		}
		return out
	}
	if !reflect.DeepEqual(conv(mi.Inputs), Inputs) || !reflect.DeepEqual(conv(mi.Outputs), Outputs) {
		t.Fatalf("model.json inputs/outputs %v %v differ from Go's %v %v", mi.Inputs, mi.Outputs, Inputs, Outputs)
	}
}
