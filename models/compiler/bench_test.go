package compiler_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/compiler/onnx/onnxtest"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// The benchmarks of BENCHMARKS.md (issue 5). Each compares a compiled
// module, run through models/host exactly as the agent runs it, with the
// plain native Go evaluator of the same model in the same process:
//
//	go test -run '^$' -bench . -count 6 ./models/compiler/

const (
	benchRows     = 1000
	benchFeatures = 32
)

// syntheticEnsemble writes an XGBoost JSON model of n full trees of the
// given depth over benchFeatures features (binary:logistic), with random
// splits, thresholds, missing-value directions and leaves.
func syntheticEnsemble(n, depth int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	nodes := 1<<(depth+1) - 1
	type treeJSON struct {
		Left      []int     `json:"left_children"`
		Right     []int     `json:"right_children"`
		Index     []int     `json:"split_indices"`
		Cond      []float32 `json:"split_conditions"`
		Default   []int     `json:"default_left"`
		SplitType []int     `json:"split_type"`
		Param     any       `json:"tree_param"`
	}
	trees := make([]treeJSON, n)
	info := make([]int, n)
	for t := range trees {
		tj := treeJSON{Param: map[string]string{"num_nodes": fmt.Sprint(nodes), "num_feature": fmt.Sprint(benchFeatures)}}
		for i := 0; i < nodes; i++ {
			if 2*i+1 < nodes {
				tj.Left = append(tj.Left, 2*i+1)
				tj.Right = append(tj.Right, 2*i+2)
				tj.Index = append(tj.Index, r.IntN(benchFeatures))
				tj.Cond = append(tj.Cond, float32(r.NormFloat64()))
				tj.Default = append(tj.Default, r.IntN(2))
			} else {
				tj.Left = append(tj.Left, -1)
				tj.Right = append(tj.Right, -1)
				tj.Index = append(tj.Index, 0)
				tj.Cond = append(tj.Cond, float32(r.NormFloat64()*0.1))
				tj.Default = append(tj.Default, 0)
			}
			tj.SplitType = append(tj.SplitType, 0)
		}
		trees[t] = tj
	}
	doc := map[string]any{
		"version": []int{1, 7, 4},
		"learner": map[string]any{
			"learner_model_param": map[string]string{"base_score": "5E-1", "num_class": "0", "num_feature": fmt.Sprint(benchFeatures), "num_target": "1"},
			"objective":           map[string]any{"name": "binary:logistic"},
			"gradient_booster": map[string]any{"name": "gbtree", "model": map[string]any{
				"trees": trees, "tree_info": info,
			}},
		},
	}
	data, err := json.Marshal(doc)
	if err != nil {
		panic(err)
	}
	return data
}

// benchInput returns rows of standard normal features, 5% of them missing
// when withMissing.
func benchInput(rows, features int, withMissing bool) [][]float32 {
	r := rand.New(rand.NewPCG(7, 7))
	out := make([][]float32, rows)
	for i := range out {
		out[i] = make([]float32, features)
		for j := range out[i] {
			out[i][j] = float32(r.NormFloat64())
			if withMissing && r.IntN(20) == 0 {
				out[i][j] = float32(math.NaN())
			}
		}
	}
	return out
}

// benchPair runs the native evaluator and the compiled module over the
// same rows, reporting ns/row for each, after checking they agree.
func benchPair(b *testing.B, m *compiler.Model, rows [][]float32) {
	res, err := compiler.Compile(m, compiler.Options{Name: "bench", Version: "1.0.0"})
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("module %d bytes, weights %d bytes", res.ModuleBytes, res.WeightBytes)
	ctx := context.Background()
	h, err := host.New(ctx, host.Options{PoolSize: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close(ctx)
	lm, err := h.Load(ctx, res.Bundle)
	if err != nil {
		b.Fatal(err)
	}
	flat := make([]float32, 0, len(rows)*len(rows[0]))
	for _, r := range rows {
		flat = append(flat, r...)
	}
	in := []tensor.Tensor{tensor.FromFloat32(m.InputName, []int64{int64(len(rows)), int64(len(rows[0]))}, flat)}
	cols := len(m.Columns())
	native := make([]float32, len(rows)*cols)
	p := m.NewPredictor()
	predictAll := func() {
		for i, r := range rows {
			p.Predict(r, native[i*cols:(i+1)*cols])
		}
	}
	predictAll()
	out, err := lm.Infer(ctx, in)
	if err != nil {
		b.Fatal(err)
	}
	got, _ := out[0].Float32s()
	for i := range native[:len(got)] {
		if d := math.Abs(float64(got[i] - native[i])); d > 1e-6*math.Max(1, math.Abs(float64(native[i]))) {
			b.Fatalf("module and native differ at %d: %v vs %v", i, got[i], native[i])
		}
	}
	// Native and wasm alternate within each iteration, so load from
	// other processes hits both alike and the ratio stays meaningful.
	var nativeTime, wasmTime time.Duration
	for b.Loop() {
		t0 := time.Now()
		predictAll()
		t1 := time.Now()
		if _, err := lm.Infer(ctx, in); err != nil {
			b.Fatal(err)
		}
		nativeTime += t1.Sub(t0)
		wasmTime += time.Since(t1)
	}
	perRow := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(b.N*len(rows)) }
	b.ReportMetric(perRow(nativeTime), "native-ns/row")
	b.ReportMetric(perRow(wasmTime), "wasm-ns/row")
	b.ReportMetric(float64(wasmTime)/float64(nativeTime), "wasm/native")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkTrees: a 100-tree depth-6 ensemble (6300 splits), 1000 rows a
// call, 5% of the values missing.
func BenchmarkTrees(b *testing.B) {
	m, err := compiler.Load(compiler.XGBoost, syntheticEnsemble(100, 6, 1))
	if err != nil {
		b.Fatal(err)
	}
	benchPair(b, m, benchInput(benchRows, benchFeatures, true))
}

// BenchmarkDense: the meter-digits network (64-32-10, ReLU, softmax) and a
// wider synthetic one (64-256-128-10, ReLU, softmax), 1000 rows a call.
func BenchmarkDense(b *testing.B) {
	b.Run("meter-digits", func(b *testing.B) {
		spec, err := compiler.ReadSpec("../examples/meter-digits")
		if err != nil {
			b.Fatal(err)
		}
		m, err := spec.Load()
		if err != nil {
			b.Fatal(err)
		}
		benchPair(b, m, benchInput(benchRows, 64, false))
	})
	b.Run("mlp-64-256-128-10", func(b *testing.B) {
		m, err := compiler.Load(compiler.ONNX, syntheticMLP([]int{64, 256, 128, 10}, 3))
		if err != nil {
			b.Fatal(err)
		}
		benchPair(b, m, benchInput(benchRows, 64, false))
	})
}

// syntheticMLP encodes an ONNX model of Gemm+Relu layers of the given
// widths, ending in Softmax, with random weights.
func syntheticMLP(widths []int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	g := &onnxtest.Graph{}
	x := "input"
	for l := 0; l+1 < len(widths); l++ {
		w := make([]float32, widths[l]*widths[l+1])
		for i := range w {
			w[i] = float32(r.NormFloat64() / math.Sqrt(float64(widths[l])))
		}
		bias := make([]float32, widths[l+1])
		for i := range bias {
			bias[i] = float32(r.NormFloat64() * 0.1)
		}
		wn, bn, y := fmt.Sprintf("W%d", l), fmt.Sprintf("B%d", l), fmt.Sprintf("h%d", l)
		g.Init(wn, []int64{int64(widths[l]), int64(widths[l+1])}, w)
		g.Init(bn, []int64{int64(widths[l+1])}, bias)
		g.Node("Gemm", y+"_gemm", []string{x, wn, bn}, y)
		x = y
		if l+2 < len(widths) {
			g.Node("Relu", y+"_relu", []string{x}, y+"r")
			x = y + "r"
		}
	}
	g.Node("Softmax", "softmax", []string{x}, "probabilities")
	return g.Model("input", widths[0], "probabilities", widths[len(widths)-1], nil)
}

// TestModuleSize checks the size bar: a module is at most its
// model's weight bytes plus 16 KiB (metadata included; the reference
// histograms are in the manifest, not the module).
func TestModuleSize(t *testing.T) {
	models := map[string]*compiler.Model{}
	var err error
	if models["trees-100x6"], err = compiler.Load(compiler.XGBoost, syntheticEnsemble(100, 6, 1)); err != nil {
		t.Fatal(err)
	}
	if models["mlp-64-256-128-10"], err = compiler.Load(compiler.ONNX, syntheticMLP([]int{64, 256, 128, 10}, 3)); err != nil {
		t.Fatal(err)
	}
	for _, dir := range specDirs(t) {
		spec, err := compiler.ReadSpec(dir)
		if err != nil {
			t.Fatal(err)
		}
		if models[spec.Name], err = spec.Load(); err != nil {
			t.Fatal(err)
		}
	}
	for name, m := range models {
		res, err := compiler.Compile(m, compiler.Options{Name: "size-test", Version: "1.0.0"})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%-26s module %7d bytes, weights %7d bytes, overhead %6d", name, res.ModuleBytes, res.WeightBytes, res.ModuleBytes-res.WeightBytes)
		if res.ModuleBytes > res.WeightBytes+16<<10 {
			t.Errorf("%s: module of %d bytes is over its %d weight bytes + 16 KiB", name, res.ModuleBytes, res.WeightBytes)
		}
	}
}
