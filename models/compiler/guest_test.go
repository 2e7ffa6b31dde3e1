package compiler_test

import (
	"context"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"

	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// guest is a compiled module instantiated bare, so tests can call its
// exports with inputs the host would never send.
type guest struct {
	t   *testing.T
	mod api.Module
}

func newGuest(t *testing.T, module []byte) *guest {
	t.Helper()
	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	t.Cleanup(func() { rt.Close(ctx) })
	mod, err := rt.Instantiate(ctx, module)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(mod.ExportedFunctionDefinitions()); n != 5 {
		t.Fatalf("%d exported functions, want the 5 of the ABI", n)
	}
	return &guest{t, mod}
}

func (g *guest) call(name string, args ...uint64) int32 {
	g.t.Helper()
	res, err := g.mod.ExportedFunction(name).Call(context.Background(), args...)
	if err != nil {
		g.t.Fatalf("%s: %v", name, err)
	}
	return int32(res[0])
}

func (g *guest) alloc(n int) uint32 {
	p := g.call("ef_alloc", uint64(n))
	if p == 0 {
		g.t.Fatalf("ef_alloc(%d) = 0", n)
	}
	return uint32(p)
}

// infer writes frame, calls ef_infer with an output buffer of outCap bytes
// and returns the code and the output or error message.
func (g *guest) infer(frame []byte, outCap int) (int32, []byte) {
	in := g.alloc(len(frame) + 1)
	out := g.alloc(outCap + 1)
	g.mod.Memory().Write(in, frame)
	code := g.call("ef_infer", uint64(in), uint64(len(frame)), uint64(out), uint64(outCap))
	if code >= 0 {
		b, _ := g.mod.Memory().Read(out, uint32(code))
		return code, append([]byte(nil), b...)
	}
	if code == -2 {
		b, _ := g.mod.Memory().Read(out, 4)
		return code, append([]byte(nil), b...)
	}
	msg := g.alloc(256)
	n := g.call("ef_last_error", uint64(msg), 256)
	b, _ := g.mod.Memory().Read(msg, uint32(n))
	return code, append([]byte(nil), b...)
}

func TestGuestRefusesBadFrames(t *testing.T) {
	spec, err := compiler.ReadSpec("testdata/fixtures/onnx-logreg-wine")
	if err != nil {
		t.Fatal(err)
	}
	res, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	g := newGuest(t, res.Bundle.Module)
	if v := g.call("ef_abi_version"); v != 1 {
		t.Fatalf("abi version %d", v)
	}
	good, err := tensor.EncodeFrame([]tensor.Tensor{tensor.FromFloat32("input", []int64{2, 13}, make([]float32, 26))})
	if err != nil {
		t.Fatal(err)
	}
	code, out := g.infer(good, 4096)
	if code <= 0 {
		t.Fatalf("good frame: code %d %s", code, out)
	}
	ts, err := tensor.DecodeFrame(out)
	if err != nil || len(ts) != 1 || ts[0].Name != "probabilities" || ts[0].Shape[0] != 2 || ts[0].Shape[1] != 3 {
		t.Fatalf("output %v %+v", err, ts)
	}
	// Too small an output buffer: -2 and the size needed.
	code, out = g.infer(good, 16)
	if code != -2 || int(binary.LittleEndian.Uint32(out)) != len(ts[0].Data)+8+2+len("probabilities")+2+16+8 {
		t.Fatalf("small buffer: code %d, need %v", code, out)
	}

	frame := func(name string, d tensor.DType, shape []int64) []byte {
		n, _ := tensor.NumElements(shape)
		f, err := tensor.EncodeFrame([]tensor.Tensor{{Name: name, DType: d, Shape: shape, Data: make([]byte, int(n)*d.Size())}})
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	two, _ := tensor.EncodeFrame([]tensor.Tensor{
		tensor.FromFloat32("input", []int64{1, 13}, make([]float32, 13)),
		tensor.FromFloat32("other", []int64{1}, make([]float32, 1)),
	})
	lying := append([]byte(nil), good...)
	binary.LittleEndian.PutUint64(lying[8+2+5+2:], 1<<40) // rows
	for _, c := range []struct {
		name  string
		frame []byte
		msg   string
	}{
		{"empty", nil, "truncated or malformed"},
		{"magic", append([]byte("XXXX"), good[4:]...), "truncated or malformed"},
		{"two tensors", two, "exactly one tensor"},
		{"name", frame("inputs", tensor.FP32, []int64{1, 13}), "another name"},
		{"dtype", frame("input", tensor.FP64, []int64{1, 13}), "not FP32"},
		{"rank", frame("input", tensor.FP32, []int64{13}), "not FP32 of rank 2"},
		{"width", frame("input", tensor.FP32, []int64{1, 12}), "13 columns"},
		{"truncated", good[:len(good)-4], "truncated or malformed"},
		{"trailing", append(append([]byte(nil), good...), 0), "truncated or malformed"},
		{"rows lie", lying, "truncated or malformed"},
	} {
		code, msg := g.infer(c.frame, 4096)
		if code != -1 || !strings.Contains(string(msg), c.msg) || !strings.Contains(string(msg), `"input" of shape [rows, 13]`) {
			t.Errorf("%s: code %d, message %q; want -1 and %q", c.name, code, msg, c.msg)
		}
	}
	// Metadata: -2 when the buffer is short, then the JSON.
	p := g.alloc(8)
	if code := g.call("ef_metadata", uint64(p), 8); code != -2 {
		t.Fatalf("ef_metadata into 8 bytes: %d", code)
	}
	// A request too large for memory is 0, not a trap.
	if p := g.call("ef_alloc", 1<<31); p != 0 {
		t.Fatalf("ef_alloc(2 GiB) = %#x", p)
	}
}
