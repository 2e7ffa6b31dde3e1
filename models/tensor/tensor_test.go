package tensor

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

func TestDTypeNames(t *testing.T) {
	seen := map[string]bool{}
	for d := BOOL; d <= FP64; d++ {
		name := d.String()
		if seen[name] {
			t.Fatalf("two dtypes named %s", name)
		}
		seen[name] = true
		got, err := ParseDType(name)
		if err != nil || got != d {
			t.Fatalf("ParseDType(%q) = %v, %v; want %v", name, got, err, d)
		}
		if d.Size() == 0 {
			t.Fatalf("%s has size 0", d)
		}
	}
	for _, bad := range []string{"", "fp32", "BYTES", "INVALID", "FP8"} {
		if _, err := ParseDType(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseDType(%q) accepted", bad)
		}
	}
	if Invalid.Valid() || DType(13).Valid() || DType(13).Size() != 0 || DType(200).String() != "DType(200)" {
		t.Fatal("invalid dtypes look valid")
	}
	// The codes are part of the ABI: pin them.
	want := map[DType]uint8{BOOL: 1, UINT8: 2, UINT16: 3, UINT32: 4, UINT64: 5, INT8: 6, INT16: 7, INT32: 8, INT64: 9, FP16: 10, FP32: 11, FP64: 12}
	for d, code := range want {
		if uint8(d) != code {
			t.Errorf("%s has code %d, ABI v1 says %d", d, d, code)
		}
	}
}

// sample builds one tensor of every dtype with awkward values.
func samples(t *testing.T) []Tensor {
	t.Helper()
	vals := map[DType][]float64{
		BOOL:   {0, 1, 1},
		UINT8:  {0, 255, 7},
		UINT16: {0, 65535, 300},
		UINT32: {0, 4294967295, 70000},
		UINT64: {0, 1 << 53, 12},
		INT8:   {-128, 127, -1},
		INT16:  {-32768, 32767, -300},
		INT32:  {-2147483648, 2147483647, -70000},
		INT64:  {-(1 << 53), 1 << 53, -1},
		FP16:   {0.5, -2, 65504},
		FP32:   {1.5, -0.25, math.MaxFloat32},
		FP64:   {math.Pi, -1e-300, math.MaxFloat64},
	}
	var out []Tensor
	for d := BOOL; d <= FP64; d++ {
		tt, err := FromFloat64("t_"+d.String(), d, []int64{3}, vals[d])
		if err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		got, err := tt.Float64s()
		if err != nil || !reflect.DeepEqual(got, vals[d]) {
			t.Fatalf("%s round trip: %v %v, want %v", d, got, err, vals[d])
		}
		out = append(out, tt)
	}
	return out
}

func TestFromFloat64Refusals(t *testing.T) {
	tests := []struct {
		d DType
		v float64
	}{
		{BOOL, 2}, {UINT8, 256}, {UINT8, -1}, {UINT8, 1.5}, {INT8, 128}, {INT16, -32769},
		{UINT32, 1 << 32}, {INT32, 1 << 31}, {INT64, 1 << 63}, {UINT64, -1}, {UINT64, 1 << 64},
		{FP16, 70000}, {FP32, 1e39}, {INT32, math.NaN()},
	}
	for _, tt := range tests {
		if _, err := FromFloat64("x", tt.d, []int64{1}, []float64{tt.v}); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s accepted %v", tt.d, tt.v)
		}
	}
	if _, err := FromFloat64("x", FP32, []int64{2}, []float64{1}); err == nil {
		t.Error("shape [2] with one value accepted")
	}
	if _, err := FromFloat64("x", Invalid, []int64{1}, []float64{1}); err == nil {
		t.Error("invalid dtype accepted")
	}
}

func TestHalfFloat(t *testing.T) {
	tests := []struct {
		f float32
		h uint16
	}{
		{0, 0}, {1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {0.000061035156, 0x0400}, // smallest normal
		{5.9604645e-08, 0x0001}, // smallest subnormal
		{float32(math.Inf(1)), 0x7c00}, {float32(math.Inf(-1)), 0xfc00},
		{1.0009765625, 0x3c01}, {1.00048828125, 0x3c00}, // tie rounds to even
	}
	for _, tt := range tests {
		h, ok := float32ToHalf(tt.f)
		if !ok || h != tt.h {
			t.Errorf("float32ToHalf(%v) = %#x, %v; want %#x", tt.f, h, ok, tt.h)
		}
		if back := halfToFloat32(tt.h); tt.f != 1.00048828125 && back != tt.f {
			t.Errorf("halfToFloat32(%#x) = %v, want %v", tt.h, back, tt.f)
		}
	}
	if _, ok := float32ToHalf(65520); ok {
		t.Error("65520 rounds to infinity in FP16 and must overflow")
	}
	if h, _ := float32ToHalf(float32(math.NaN())); !math.IsNaN(float64(halfToFloat32(h))) {
		t.Error("NaN did not stay NaN")
	}
	// Every half value survives float32 and back.
	for h := 0; h < 1<<16; h++ {
		f := halfToFloat32(uint16(h))
		if math.IsNaN(float64(f)) {
			continue
		}
		if back, ok := float32ToHalf(f); !ok || back != uint16(h) {
			t.Fatalf("half %#x -> %v -> %#x", h, f, back)
		}
	}
}

func TestFloat32s(t *testing.T) {
	for _, tt := range samples(t) {
		f32, err := tt.Float32s()
		if err != nil {
			t.Fatal(err)
		}
		f64, _ := tt.Float64s()
		for i := range f32 {
			if f32[i] != float32(f64[i]) {
				t.Errorf("%s element %d: Float32s %v, Float64s %v", tt.DType, i, f32[i], f64[i])
			}
		}
	}
	if _, err := (Tensor{Name: "x", DType: FP32, Data: make([]byte, 3)}).Float32s(); err == nil {
		t.Error("3 bytes of FP32 accepted")
	}
}

func TestFrameRoundTrip(t *testing.T) {
	ts := samples(t)
	ts = append(ts,
		Tensor{Name: "scalar", DType: FP64, Shape: []int64{}, Data: make([]byte, 8)},
		Tensor{Name: "empty", DType: FP32, Shape: []int64{0, 4}, Data: []byte{}},
		FromFloat32("matrix ü", []int64{2, 3}, []float32{1, 2, 3, 4, 5, 6}),
	)
	enc, err := EncodeFrame(ts)
	if err != nil {
		t.Fatal(err)
	}
	if len(enc) != FrameSize(ts) {
		t.Fatalf("frame is %d bytes, FrameSize says %d", len(enc), FrameSize(ts))
	}
	dec, err := DecodeFrame(enc)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(dec, ts) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", dec, ts)
	}
	// AppendFrame appends.
	buf, err := AppendFrame([]byte("xy"), ts[:1])
	if err != nil || string(buf[:2]) != "xy" || string(buf[2:6]) != FrameMagic {
		t.Fatalf("AppendFrame: %q %v", buf, err)
	}
	// An empty frame is valid.
	if dec, err := DecodeFrame([]byte("EFT1\x00\x00\x00\x00")); err != nil || len(dec) != 0 {
		t.Fatalf("empty frame: %v %v", dec, err)
	}
}

// frame hand-encodes one tensor, so refusals can break any field.
func frame(count uint32, name string, dtype, rank byte, dims []uint64, dataLen uint64, data []byte) []byte {
	b := []byte(FrameMagic)
	b = binary.LittleEndian.AppendUint32(b, count)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(name)))
	b = append(b, name...)
	b = append(b, dtype, rank)
	for _, d := range dims {
		b = binary.LittleEndian.AppendUint64(b, d)
	}
	b = binary.LittleEndian.AppendUint64(b, dataLen)
	return append(b, data...)
}

func TestDecodeFrameRefusals(t *testing.T) {
	good := frame(1, "x", byte(FP32), 1, []uint64{2}, 8, make([]byte, 8))
	if _, err := DecodeFrame(good); err != nil {
		t.Fatalf("the base frame is refused: %v", err)
	}
	tests := []struct {
		name  string
		frame []byte
		want  string
	}{
		{"empty", nil, "truncated"},
		{"bad magic", append([]byte("EFT2"), good[4:]...), "not a tensor frame"},
		{"count too high", frame(2, "x", byte(FP32), 1, []uint64{2}, 8, make([]byte, 8)), "truncated"},
		{"huge count", frame(1<<31, "x", byte(FP32), 1, []uint64{2}, 8, make([]byte, 8)), "tensors"},
		{"truncated data", good[:len(good)-1], "data bytes"},
		{"trailing bytes", append(append([]byte{}, good...), 0), "after the last tensor"},
		{"data short of shape", frame(1, "x", byte(FP32), 1, []uint64{3}, 8, make([]byte, 8)), "needs 12 data bytes"},
		{"unknown dtype", frame(1, "x", 99, 1, []uint64{2}, 8, make([]byte, 8)), "unknown dtype"},
		{"dtype zero", frame(1, "x", 0, 1, []uint64{2}, 8, make([]byte, 8)), "unknown dtype"},
		{"empty name", frame(1, "", byte(FP32), 1, []uint64{2}, 8, make([]byte, 8)), "name"},
		{"invalid utf-8 name", frame(1, "\xff", byte(FP32), 1, []uint64{2}, 8, make([]byte, 8)), "UTF-8"},
		{"rank too high", frame(1, "x", byte(FP32), 33, make([]uint64, 33), 0, nil), "rank 33"},
		{"dim over limit", frame(1, "x", byte(UINT8), 2, []uint64{1 << 32, 1 << 32}, 0, nil), "dimension 0"},
		{"product over limit", frame(1, "x", byte(UINT8), 2, []uint64{1 << 16, 1 << 16}, 0, nil), "elements"},
		{"dim negative as int64", frame(1, "x", byte(UINT8), 1, []uint64{math.MaxUint64}, 0, nil), "dimension"},
		{"product overflows int64", frame(1, "x", byte(FP64), 4, []uint64{1 << 20, 1 << 20, 1 << 20, 1 << 20}, 0, nil), "elements"},
		{"bool not 0 or 1", frame(1, "b", byte(BOOL), 1, []uint64{1}, 1, []byte{2}), "BOOL"},
		{"data length past end", frame(1, "x", byte(FP32), 1, []uint64{2}, 1<<62, make([]byte, 8)), "claims"},
		{"duplicate names", func() []byte {
			f, _ := EncodeFrame([]Tensor{FromFloat32("a", []int64{1}, []float32{1})})
			f = append(f, f[8:]...)
			binary.LittleEndian.PutUint32(f[4:], 2)
			return f
		}(), "two tensors are named"},
		{"over MaxFrame", make([]byte, MaxFrame+1), "limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeFrame(tt.frame)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrInvalid containing %q", err, tt.want)
			}
		})
	}
}

func TestEncodeFrameRefusals(t *testing.T) {
	tests := []struct {
		name string
		ts   []Tensor
	}{
		{"shape and data disagree", []Tensor{FromFloat32("x", []int64{3}, []float32{1, 2})}},
		{"negative dim", []Tensor{{Name: "x", DType: UINT8, Shape: []int64{-1}, Data: nil}}},
		{"no name", []Tensor{FromFloat32("", []int64{1}, []float32{1})}},
		{"duplicate", []Tensor{FromFloat32("x", []int64{1}, []float32{1}), FromFloat32("x", []int64{1}, []float32{1})}},
		{"too many", make([]Tensor, MaxTensors+1)},
		{"too big", []Tensor{{Name: "x", DType: UINT8, Shape: []int64{MaxFrame}, Data: make([]byte, MaxFrame)}}},
	}
	for _, tt := range tests {
		if _, err := EncodeFrame(tt.ts); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", tt.name, err)
		}
	}
}

func FuzzDecodeFrame(f *testing.F) {
	ts := []Tensor{FromFloat32("x", []int64{2}, []float32{1, 2}), {Name: "b", DType: BOOL, Shape: []int64{1, 1}, Data: []byte{1}}}
	enc, _ := EncodeFrame(ts)
	f.Add(enc)
	f.Add([]byte("EFT1\x00\x00\x00\x00"))
	f.Add(frame(1, "x", byte(FP16), 0, nil, 2, []byte{0, 0x3c}))
	f.Fuzz(func(t *testing.T, b []byte) {
		ts, err := DecodeFrame(b)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to the same bytes.
		again, err := EncodeFrame(ts)
		if err != nil {
			t.Fatalf("decoded frame does not encode: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs:\n%x\n%x", again, b)
		}
	})
}

func TestSpec(t *testing.T) {
	s := Spec{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := s.Check(FromFloat32("readings", []int64{7, 4}, make([]float32, 28))); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Tensor{
		FromFloat32("other", []int64{1, 4}, make([]float32, 4)),
		FromFloat32("readings", []int64{1, 5}, make([]float32, 5)),
		FromFloat32("readings", []int64{4}, make([]float32, 4)),
		{Name: "readings", DType: FP64, Shape: []int64{1, 4}, Data: make([]byte, 32)},
	} {
		if err := s.Check(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("Check(%s %s%v) accepted", bad.Name, bad.DType, bad.Shape)
		}
	}
	for _, bad := range []Spec{{Datatype: "FP32"}, {Name: "x", Datatype: "fp32"}, {Name: "x", Datatype: "FP32", Shape: []int64{-2}}} {
		if bad.Validate() == nil {
			t.Errorf("Validate(%+v) accepted", bad)
		}
	}
	specs := []Spec{s, {Name: "mask", Datatype: "BOOL", Shape: []int64{-1}}}
	in := []Tensor{{Name: "mask", DType: BOOL, Shape: []int64{1}, Data: []byte{1}}, FromFloat32("readings", []int64{1, 4}, make([]float32, 4))}
	if err := CheckAll(specs, in, "input"); err != nil {
		t.Fatalf("CheckAll in another order: %v", err)
	}
	if err := CheckAll(specs, in[:1], "input"); err == nil || !strings.Contains(err.Error(), "readings FP32[-1 4]") {
		t.Fatalf("CheckAll with one missing: %v", err)
	}
	if err := CheckAll(specs, []Tensor{in[0], in[0]}, "input"); err == nil {
		t.Fatal("CheckAll with a duplicate and a missing tensor accepted")
	}
}

func TestOIPRoundTrip(t *testing.T) {
	for _, tt := range samples(t) {
		o, err := ToOIP(tt)
		if err != nil {
			t.Fatalf("%s: %v", tt.DType, err)
		}
		// Through real JSON, as on the wire.
		js, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		var o2 OIPTensor
		if err := json.Unmarshal(js, &o2); err != nil {
			t.Fatal(err)
		}
		back, err := FromOIP(o2)
		if err != nil {
			t.Fatalf("%s: %s: %v", tt.DType, js, err)
		}
		if !reflect.DeepEqual(back, tt) {
			t.Fatalf("%s round trip via %s:\n got %+v\nwant %+v", tt.DType, js, back, tt)
		}
	}
	// Full 64-bit integers survive (they would not through float64).
	big := Tensor{Name: "id", DType: INT64, Shape: []int64{1}, Data: binary.LittleEndian.AppendUint64(nil, uint64(math.MaxInt64))}
	o, _ := ToOIP(big)
	if string(o.Data) != "[9223372036854775807]" {
		t.Fatalf("INT64 max as %s", o.Data)
	}
	if back, err := FromOIP(o); err != nil || !bytes.Equal(back.Data, big.Data) {
		t.Fatalf("INT64 max back: %v %v", back, err)
	}
	// Scalars have shape [] not null.
	o, _ = ToOIP(Tensor{Name: "s", DType: FP32, Shape: nil, Data: make([]byte, 4)})
	if js, _ := json.Marshal(o); !strings.Contains(string(js), `"shape":[]`) {
		t.Fatalf("scalar JSON %s", js)
	}
	if _, err := ToOIP(FromFloat32("nan", []int64{1}, []float32{float32(math.NaN())})); err == nil {
		t.Fatal("NaN went into JSON")
	}
}

func TestFromOIP(t *testing.T) {
	fp := func(v ...float32) []byte { return FromFloat32("x", nil, v).Data }
	tests := []struct {
		name     string
		datatype string
		shape    []int64
		data     string
		want     []byte // nil: must be refused
	}{
		{"flat", "FP32", []int64{2, 2}, "[1, 2, 3, 4]", fp(1, 2, 3, 4)},
		{"nested", "FP32", []int64{2, 2}, "[[1, 2], [3, 4]]", fp(1, 2, 3, 4)},
		{"nested 3d", "FP32", []int64{2, 1, 2}, "[[[1, 2]], [[3, 4]]]", fp(1, 2, 3, 4)},
		{"scalar bare", "FP32", []int64{}, "7", fp(7)},
		{"scalar in array", "FP32", []int64{}, "[7]", fp(7)},
		{"empty", "FP32", []int64{0, 4}, "[]", []byte{}},
		{"empty nested", "FP32", []int64{2, 0}, "[[], []]", []byte{}},
		{"exponent", "FP64", []int64{1}, "[1e-3]", binary.LittleEndian.AppendUint64(nil, math.Float64bits(1e-3))},
		{"bool", "BOOL", []int64{3}, "[true, false, true]", []byte{1, 0, 1}},
		{"int8", "INT8", []int64{2}, "[-128, 127]", []byte{0x80, 0x7f}},
		{"uint64 max", "UINT64", []int64{1}, "[18446744073709551615]", binary.LittleEndian.AppendUint64(nil, math.MaxUint64)},

		{"count short", "FP32", []int64{2, 2}, "[1, 2, 3]", nil},
		{"count long", "FP32", []int64{2, 2}, "[1, 2, 3, 4, 5]", nil},
		{"ragged", "FP32", []int64{2, 2}, "[[1, 2], [3]]", nil},
		{"ragged compensated", "FP32", []int64{2, 2}, "[[1, 2, 3], [4]]", nil},
		{"nested wrong rows", "FP32", []int64{2, 2}, "[[1, 2], [3, 4], [5, 6]]", nil},
		{"nested too deep", "FP32", []int64{2, 2}, "[[[1, 2]], [[3, 4]]]", nil},
		{"nested shallower than rank", "FP32", []int64{1, 2, 2}, "[[1, 2], [3, 4]]", nil},
		{"mixed levels", "FP32", []int64{2, 2}, "[1, [2, 3], 4]", nil},
		{"mixed levels 2", "FP32", []int64{2, 2}, "[[1, 2], 3, 4]", nil},
		{"scalar bare for vector", "FP32", []int64{1}, "7", nil},
		{"string", "FP32", []int64{1}, `["1"]`, nil},
		{"null is missing (FP32)", "FP32", []int64{3}, `[1, null, 3]`, fp(1, float32(math.NaN()), 3)},
		{"null is missing (nested)", "FP32", []int64{2, 2}, `[[null, 2], [3, null]]`, fp(float32(math.NaN()), 2, 3, float32(math.NaN()))},
		{"null is missing (FP64)", "FP64", []int64{1}, `[null]`, binary.LittleEndian.AppendUint64(nil, math.Float64bits(math.NaN()))},
		{"null is missing (FP16)", "FP16", []int64{1}, `[null]`, []byte{0x00, 0x7e}},
		{"scalar null", "FP32", []int64{}, `null`, fp(float32(math.NaN()))},
		{"null for int", "INT32", []int64{1}, `[null]`, nil},
		{"null for bool", "BOOL", []int64{1}, `[null]`, nil},
		{"null for int64", "INT64", []int64{1}, `[null]`, nil},
		{"null data", "FP32", []int64{1}, `null`, nil},
		{"null row", "FP32", []int64{2, 1}, `[[1], null]`, nil},
		{"object", "FP32", []int64{1}, `{"a": 1}`, nil},
		{"trailing", "FP32", []int64{1}, `[1] [2]`, nil},
		{"broken json", "FP32", []int64{1}, `[1`, nil},
		{"no data", "FP32", []int64{1}, ``, nil},
		{"fraction for int", "INT32", []int64{1}, "[1.5]", nil},
		{"exponent for int", "INT32", []int64{1}, "[1e3]", nil},
		{"int8 overflow", "INT8", []int64{1}, "[128]", nil},
		{"uint negative", "UINT16", []int64{1}, "[-1]", nil},
		{"uint64 overflow", "UINT64", []int64{1}, "[18446744073709551616]", nil},
		{"fp32 overflow", "FP32", []int64{1}, "[1e39]", nil},
		{"bool as number", "BOOL", []int64{1}, "[1]", nil},
		{"number as bool", "FP32", []int64{1}, "[true]", nil},
		{"unknown datatype", "BYTES", []int64{1}, `["a"]`, nil},
		{"negative shape", "FP32", []int64{-1}, "[1]", nil},
		{"huge shape", "FP32", []int64{1 << 40}, "[1]", nil},
		{"deep nesting", "FP32", []int64{1}, strings.Repeat("[", 100) + "1" + strings.Repeat("]", 100), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := FromOIP(OIPTensor{Name: "x", Datatype: tt.datatype, Shape: tt.shape, Data: json.RawMessage(tt.data)})
			if tt.want == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", got)
				}
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `"x"`) {
					t.Fatalf("err = %v, want ErrInvalid naming the input", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Data, tt.want) {
				t.Fatalf("data %v, want %v", got.Data, tt.want)
			}
		})
	}
}

func TestInferRequestJSON(t *testing.T) {
	body := `{"id":"42","inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[[230,10,50,25]]}],"outputs":[{"name":"score"}]}`
	var req InferRequest
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		t.Fatal(err)
	}
	if req.ID != "42" || len(req.Inputs) != 1 || len(req.Outputs) != 1 || req.Outputs[0].Name != "score" {
		t.Fatalf("%+v", req)
	}
	in, err := FromOIP(req.Inputs[0])
	if err != nil {
		t.Fatal(err)
	}
	v, _ := in.Float32s()
	if !reflect.DeepEqual(v, []float32{230, 10, 50, 25}) {
		t.Fatal(v)
	}
	out, _ := ToOIP(FromFloat32("score", []int64{1}, []float32{0.25}))
	js, _ := json.Marshal(InferResponse{ModelName: "grid-anomaly", ModelVersion: "1.0.0", ID: req.ID, Outputs: []OIPTensor{out}})
	want := `{"model_name":"grid-anomaly","model_version":"1.0.0","id":"42","outputs":[{"name":"score","shape":[1],"datatype":"FP32","data":[0.25]}]}`
	if string(js) != want {
		t.Fatalf("response\n got %s\nwant %s", js, want)
	}
}

func FuzzFromOIP(f *testing.F) {
	f.Add("FP32", []byte{2, 2}, []byte("[[1,2],[3,4]]"))
	f.Add("BOOL", []byte{1}, []byte("[true]"))
	f.Add("INT64", []byte{}, []byte("-9223372036854775808"))
	f.Add("UINT8", []byte{0, 3}, []byte("[]"))
	f.Add("FP32", []byte{1, 3}, []byte("[[1,null,3]]"))
	f.Add("FP64", []byte{2}, []byte("[null,2]"))
	f.Add("INT32", []byte{1}, []byte("[null]"))
	f.Fuzz(func(t *testing.T, datatype string, shape []byte, data []byte) {
		if len(shape) > 8 {
			return
		}
		s := make([]int64, len(shape))
		for i, d := range shape {
			s[i] = int64(int8(d)) // small, and sometimes negative
		}
		got, err := FromOIP(OIPTensor{Name: "x", Datatype: datatype, Shape: s, Data: data})
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error without ErrInvalid: %v", err)
			}
			return
		}
		if err := got.Validate(); err != nil {
			t.Fatalf("FromOIP returned an invalid tensor: %v", err)
		}
		// Accepted data converts back and forth to the same tensor (FP16
		// and FP32 were already rounded on the way in).
		o, err := ToOIP(got)
		if err != nil {
			return // NaN (from null) or Inf (FP16 overflow) cannot go back to JSON
		}
		again, err := FromOIP(o)
		if err != nil || !bytes.Equal(again.Data, got.Data) {
			t.Fatalf("round trip of %s: %v %v", o.Data, again, err)
		}
	})
}
