package compiler_test

import (
	"context"
	"math"
	"os"
	"testing"

	"github.com/tetratelabs/wazero"

	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// FuzzCompile: whatever model file the readers accept compiles into a
// module that wazero validates and that answers a row (with missing
// values) through the ABI without trapping. The first byte picks the
// format.
func FuzzCompile(f *testing.F) {
	for _, p := range []string{"testdata/fixtures/xgb-wine/model.xgb.json", "testdata/fixtures/onnx-logreg-wine/model.onnx", "../examples/maintenance-risk/model.onnx"} {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		format := byte(0)
		if p[len(p)-4:] == "onnx" {
			format = 1
		}
		f.Add(append([]byte{format}, data...))
	}
	f.Add(append([]byte{0}, syntheticEnsemble(3, 4, 9)...))
	f.Add(append([]byte{1}, syntheticMLP([]int{5, 7, 3}, 4)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		format := compiler.XGBoost
		if data[0]&1 == 1 {
			format = compiler.ONNX
		}
		m, err := compiler.Load(format, data[1:])
		if err != nil {
			return
		}
		res, err := compiler.Compile(m, compiler.Options{Name: "fuzz", Version: "1.0.0"})
		if err != nil {
			t.Fatalf("a model the reader accepts does not compile: %v", err)
		}
		ctx := context.Background()
		rt := wazero.NewRuntime(ctx)
		defer rt.Close(ctx)
		mod, err := rt.Instantiate(ctx, res.Bundle.Module)
		if err != nil {
			t.Fatalf("module does not validate: %v", err)
		}
		row := make([]float32, len(m.Features))
		for i := range row {
			row[i] = float32(i%5) - 2
			if i%4 == 3 {
				row[i] = float32(math.NaN())
			}
		}
		frame, err := tensor.EncodeFrame([]tensor.Tensor{tensor.FromFloat32(m.InputName, []int64{1, int64(len(row))}, row)})
		if err != nil {
			t.Fatal(err)
		}
		alloc := mod.ExportedFunction("ef_alloc")
		in, err := alloc.Call(ctx, uint64(len(frame)))
		if err != nil || in[0] == 0 {
			t.Fatalf("ef_alloc: %v %v", in, err)
		}
		out, err := alloc.Call(ctx, 1<<20)
		if err != nil || out[0] == 0 {
			t.Fatalf("ef_alloc: %v %v", out, err)
		}
		mod.Memory().Write(uint32(in[0]), frame)
		n, err := mod.ExportedFunction("ef_infer").Call(ctx, in[0], uint64(len(frame)), out[0], 1<<20)
		if err != nil || int32(n[0]) <= 0 {
			t.Fatalf("ef_infer: %v %v", n, err)
		}
		b, _ := mod.Memory().Read(uint32(out[0]), uint32(n[0]))
		ts, err := tensor.DecodeFrame(b)
		if err != nil || len(ts) != len(m.Outputs) {
			t.Fatalf("output frame: %v, %d tensors", err, len(ts))
		}
	})
}
