package onnx_test

import (
	"errors"
	"math"
	"os"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/compiler/onnx"
	"github.com/edgefleet/edgefleet/models/compiler/onnx/onnxtest"
)

// mlp is 3 inputs -> Gemm(transB) 2 -> Relu -> MatMul 2 -> Add -> Softmax.
func mlp(edit func(g *onnxtest.Graph)) []byte {
	g := &onnxtest.Graph{}
	g.Init("W1", []int64{2, 3}, []float32{1, 0, -1, 0.5, 0.5, 0.5})
	g.Init("B1", []int64{2}, []float32{0.1, -0.2})
	g.Init("W2", []int64{2, 2}, []float32{1, -1, 2, 0})
	g.Init("B2", []int64{1, 2}, []float32{0, 1})
	g.Node("Gemm", "fc1", []string{"input", "W1", "B1"}, "h", onnxtest.Attr{Name: "transB", I: 1})
	g.Node("Relu", "relu", []string{"h"}, "a")
	g.Node("MatMul", "fc2", []string{"a", "W2"}, "m")
	g.Node("Add", "bias2", []string{"B2", "m"}, "z") // constant first: Add commutes
	g.Node("Softmax", "softmax", []string{"z"}, "probabilities", onnxtest.Attr{Name: "axis", I: -1})
	if edit != nil {
		edit(g)
	}
	return g.Model("input", 3, "probabilities", 2, []string{"labels", `["no","yes"]`, "feature_names", "x,y,z"})
}

func TestParseAndPredict(t *testing.T) {
	m, err := onnx.Parse(mlp(nil))
	if err != nil {
		t.Fatal(err)
	}
	if m.NumFeatures() != 3 || len(m.Steps) != 5 || strings.Join(m.Labels, ",") != "no,yes" || strings.Join(m.Features, ",") != "x,y,z" {
		t.Fatalf("model %+v", m)
	}
	if m.NumWeights() != 6+2+4+2 {
		t.Fatalf("%d weights", m.NumWeights())
	}
	x := []float32{1, 2, 3}
	// by hand: h = [1-3+0.1, 3+(-0.2)] = [-1.9, 2.8]; a = [0, 2.8];
	// m = a @ [[1,-1],[2,0]] = [5.6, 0]; z = [5.6, 1]
	z0, z1 := float64(float32(5.6)), 1.0
	e0, e1 := math.Exp(z0-z0), math.Exp(z1-z0)
	want := []float64{e0 / (e0 + e1), e1 / (e0 + e1)}
	got := m.Predict(m.NewScratch(), x)[0]
	for i := range want {
		if math.Abs(float64(got[i])-want[i]) > 1e-6 {
			t.Fatalf("Predict = %v, want %v", got, want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(g *onnxtest.Graph)
		is   error
		want string
	}{
		{"unsupported op", func(g *onnxtest.Graph) { g.Node("Conv", "conv7", []string{"probabilities"}, "c") }, onnx.ErrUnsupported, `node "conv7": operator Conv is not supported`},
		{"transA", func(g *onnxtest.Graph) {
			g.Node("Gemm", "g2", []string{"probabilities", "W2"}, "q", onnxtest.Attr{Name: "transA", I: 1})
		}, onnx.ErrUnsupported, "transA=1"},
		{"runtime B", func(g *onnxtest.Graph) { g.Node("MatMul", "mm", []string{"probabilities", "z"}, "q") }, onnx.ErrUnsupported, "must be a constant"},
		{"inner dims", func(g *onnxtest.Graph) { g.Node("MatMul", "mm", []string{"input", "W2"}, "q") }, onnx.ErrInvalid, "inner dimensions differ"},
		{"softmax axis", func(g *onnxtest.Graph) {
			g.Node("Softmax", "sm0", []string{"z"}, "q", onnxtest.Attr{Name: "axis", I: 0})
		}, onnx.ErrUnsupported, "axis 0"},
		{"undefined input", func(g *onnxtest.Graph) { g.Node("Relu", "r2", []string{"nowhere"}, "q") }, onnx.ErrInvalid, `uses "nowhere" before any node computes it`},
		{"add widths", func(g *onnxtest.Graph) { g.Node("Add", "add3", []string{"input", "z"}, "q") }, onnx.ErrUnsupported, "Add of"},
		{"bad broadcast", func(g *onnxtest.Graph) {
			g.Init("C3", []int64{3}, []float32{1, 2, 3})
			g.Node("Add", "addc", []string{"z", "C3"}, "q")
		}, onnx.ErrUnsupported, "does not broadcast"},
		{"duplicate output", func(g *onnxtest.Graph) { g.Node("Relu", "again", []string{"h"}, "a") }, onnx.ErrInvalid, "computed twice"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := onnx.Parse(mlp(c.edit))
			if !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v; want %v naming %q", err, c.is, c.want)
			}
		})
	}
}

func TestInputsAndOutputs(t *testing.T) {
	g := &onnxtest.Graph{}
	g.Node("Relu", "r", []string{"input"}, "y")
	if _, err := onnx.Parse(g.Model("input", 4, "missing", 4, nil)); !errors.Is(err, onnx.ErrInvalid) || !strings.Contains(err.Error(), `graph output "missing"`) {
		t.Fatalf("missing output: %v", err)
	}
	if _, err := onnx.Parse(g.Model("input", 4, "y", 5, nil)); !errors.Is(err, onnx.ErrInvalid) || !strings.Contains(err.Error(), "declared [batch, 5]") {
		t.Fatalf("wrong output width: %v", err)
	}
	m, err := onnx.Parse(g.Model("input", 4, "y", 4, []string{"feature_names", "[1]"}))
	if err == nil || !strings.Contains(err.Error(), "feature_names") {
		t.Fatalf("bad feature names: %v %v", m, err)
	}
	g.Opset = 11 // Softmax's default axis is 1 before opset 13
	g.Node("Softmax", "s", []string{"y"}, "p")
	if _, err := onnx.Parse(g.Model("input", 4, "p", 4, nil)); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptFiles(t *testing.T) {
	good := mlp(nil)
	for n := 0; n < len(good); n += 7 {
		if _, err := onnx.Parse(good[:n]); err == nil {
			// Some prefixes end exactly between fields and parse, but
			// then lack the graph's later parts: never a panic, and
			// never the full model.
			continue
		}
	}
	for _, bad := range [][]byte{nil, []byte("not onnx at all"), {0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f}, {0x08}} {
		if _, err := onnx.Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
	flipped := append([]byte(nil), good...)
	for i := 10; i < len(flipped); i += 13 {
		flipped[i] ^= 0x55
	}
	if _, err := onnx.Parse(flipped); err == nil {
		t.Error("a corrupted model parsed")
	}
}

// FuzzParse: no input makes Parse panic, and a model Parse accepts
// evaluates a row without panicking.
func FuzzParse(f *testing.F) {
	f.Add(mlp(nil))
	for _, p := range []string{"../testdata/fixtures/onnx-logreg-wine/model.onnx", "../../examples/meter-digits/model.onnx", "../../examples/maintenance-risk/model.onnx"} {
		if data, err := os.ReadFile(p); err == nil {
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := onnx.Parse(data)
		if err != nil {
			return
		}
		x := make([]float32, m.NumFeatures())
		m.Predict(m.NewScratch(), x)
	})
}
