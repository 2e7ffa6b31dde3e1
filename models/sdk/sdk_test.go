package sdk

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/tensor"
)

// double is a model that doubles x, and fails on purpose for some inputs.
func double() Model {
	return Model{
		Name: "double", Version: "1.2.3",
		Inputs:  []tensor.Spec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []tensor.Spec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
		Infer: func(in []tensor.Tensor) ([]tensor.Tensor, error) {
			x, _ := in[0].Float32s()
			if len(x) > 0 {
				switch x[0] {
				case -1:
					return nil, errors.New("boom")
				case -2:
					return nil, ErrBadInput
				case -3:
					panic("kaboom")
				case -4:
					return []tensor.Tensor{tensor.FromFloat32("z", []int64{1}, []float32{1})}, nil
				}
			}
			y := make([]float32, len(x))
			for i := range x {
				y[i] = 2 * x[i]
			}
			return []tensor.Tensor{tensor.FromFloat32("y", []int64{int64(len(y))}, y)}, nil
		},
	}
}

func input(t *testing.T, x ...float32) []byte {
	t.Helper()
	f, err := tensor.EncodeFrame([]tensor.Tensor{tensor.FromFloat32("x", []int64{int64(len(x))}, x)})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestInfer(t *testing.T) {
	r, err := newRuntime(double())
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 1024)
	n := r.infer(input(t, 1, 2.5), out)
	if n < 0 {
		t.Fatalf("code %d: %s", n, r.lastErr)
	}
	ts, err := tensor.DecodeFrame(out[:n])
	if err != nil {
		t.Fatal(err)
	}
	y, _ := ts[0].Float32s()
	if ts[0].Name != "y" || len(y) != 2 || y[0] != 2 || y[1] != 5 {
		t.Fatalf("got %+v %v", ts, y)
	}
}

func TestInferErrors(t *testing.T) {
	r, err := newRuntime(double())
	if err != nil {
		t.Fatal(err)
	}
	wrongName, _ := tensor.EncodeFrame([]tensor.Tensor{tensor.FromFloat32("w", []int64{1}, []float32{1})})
	tests := []struct {
		name string
		in   []byte
		cap  int
		code int32
		msg  string
	}{
		{"garbage", []byte("nope"), 64, CodeBadInput, "frame"},
		{"wrong input", wrongName, 64, CodeBadInput, `"x" is missing`},
		{"model error", input(t, -1), 64, CodeInternal, "boom"},
		{"model bad input", input(t, -2), 64, CodeBadInput, "bad input"},
		{"panic", input(t, -3), 64, CodeInternal, "panicked: kaboom"},
		{"undeclared output", input(t, -4), 64, CodeInternal, "do not match"},
		{"output too small", input(t, 1, 2, 3), 20, CodeOutputTooSmall, "needs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := make([]byte, tt.cap)
			if got := r.infer(tt.in, out); got != tt.code {
				t.Fatalf("code %d, want %d (%s)", got, tt.code, r.lastErr)
			}
			msg := make([]byte, 256)
			if m := string(msg[:r.lastError(msg)]); !strings.Contains(m, tt.msg) {
				t.Fatalf("last error %q, want it to contain %q", m, tt.msg)
			}
		})
	}
	// The too-small answer carries the size needed, and that size works.
	out := make([]byte, 20)
	r.infer(input(t, 1, 2, 3), out)
	need := binary.LittleEndian.Uint32(out)
	out = make([]byte, need)
	if n := r.infer(input(t, 1, 2, 3), out); n != int32(need) {
		t.Fatalf("with the hinted %d bytes: code %d", need, n)
	}
	// A long message is truncated to the caller's buffer.
	if n := r.lastError(make([]byte, 3)); n != 3 {
		t.Fatalf("lastError wrote %d bytes into 3", n)
	}
}

func TestMetadata(t *testing.T) {
	r, err := newRuntime(double())
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 512)
	n := r.metadata(out)
	var md struct {
		Name, Version   string
		Inputs, Outputs []tensor.Spec
	}
	if err := json.Unmarshal(out[:n], &md); err != nil {
		t.Fatalf("%s: %v", out[:n], err)
	}
	if md.Name != "double" || md.Version != "1.2.3" || len(md.Inputs) != 1 || md.Outputs[0].Name != "y" {
		t.Fatalf("%+v", md)
	}
	if r.metadata(make([]byte, 5)) != CodeOutputTooSmall {
		t.Fatal("metadata into 5 bytes did not report too small")
	}
}

func TestNewRuntimeRefusesBadModels(t *testing.T) {
	for name, change := range map[string]func(*Model){
		"no name":        func(m *Model) { m.Name = "" },
		"no version":     func(m *Model) { m.Version = "" },
		"no infer":       func(m *Model) { m.Infer = nil },
		"no inputs":      func(m *Model) { m.Inputs = nil },
		"no outputs":     func(m *Model) { m.Outputs = nil },
		"bad datatype":   func(m *Model) { m.Inputs = []tensor.Spec{{Name: "x", Datatype: "float"}} },
		"bad dimension":  func(m *Model) { m.Outputs = []tensor.Spec{{Name: "y", Datatype: "FP32", Shape: []int64{-3}}} },
		"unnamed tensor": func(m *Model) { m.Outputs = []tensor.Spec{{Datatype: "FP32"}} },
	} {
		m := double()
		change(&m)
		if _, err := newRuntime(m); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	var empty runtime
	if empty.infer(nil, nil) != CodeInternal || !strings.Contains(empty.lastErr, "sdk.Register") {
		t.Fatal("a module without a registered model must say so")
	}
}

func TestFindRegion(t *testing.T) {
	r := &runtime{}
	a, b := r.alloc(100), r.alloc(0)
	bases := map[*byte]uint32{&a[0]: 1000, &b[0]: 5000}
	base := func(s []byte) uint32 { return bases[&s[0]] }
	tests := []struct {
		ptr, n uint32
		ok     bool
	}{
		{1000, 100, true}, {1010, 90, true}, {1099, 1, true}, {1000, 0, true},
		{1000, 101, false}, {999, 1, false}, {1100, 1, false}, {5000, 1, true}, {5000, 2, false},
		{0xffffffff, 2, false},
	}
	for _, tt := range tests {
		got, ok := r.find(tt.ptr, tt.n, base)
		if ok != tt.ok || (ok && len(got) != int(tt.n)) {
			t.Errorf("find(%d, %d) = %d bytes, %v; want %v", tt.ptr, tt.n, len(got), ok, tt.ok)
		}
	}
	if got, _ := r.find(1010, 5, base); &got[0] != &a[10] {
		t.Error("find returned the wrong bytes")
	}
}

func TestMetadataJSONEscapes(t *testing.T) {
	m := double()
	m.Name = "we\"ird\\ \x01 ü \xff"
	m.Inputs = []tensor.Spec{{Name: "a\nb", Datatype: "FP32", Shape: []int64{-1, 0, 7}}, {Name: "s", Datatype: "BOOL", Shape: []int64{}}}
	var md struct {
		Name, Version   string
		Inputs, Outputs []tensor.Spec
	}
	raw := metadataJSON(m)
	if err := json.Unmarshal(raw, &md); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	if md.Name != "we\"ird\\ \x01 ü \uFFFD" || md.Inputs[0].Name != "a\nb" || len(md.Inputs[0].Shape) != 3 || md.Inputs[0].Shape[0] != -1 || md.Inputs[1].Shape == nil {
		t.Fatalf("decoded %+v from %s", md, raw)
	}
}
