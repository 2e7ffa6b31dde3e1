// Package tensor is the tensor vocabulary shared by the model host, the
// guest SDK and the agent's local endpoint: data types named as in the Open
// Inference Protocol (OIP) v2, the binary tensor frame that crosses the WASM
// boundary (models/ABI.md), and conversion to and from OIP's JSON shapes.
//
// The package has no dependencies beyond the standard library so that it
// compiles for GOOS=wasip1 inside guests as well as on the host.
package tensor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unicode/utf8"
)

// DType is a tensor element type. Its numeric value is the dtype code used
// in the binary frame; the codes are part of Model ABI v1 and never change.
type DType uint8

// Element types. Names and meaning follow the Open Inference Protocol.
// BYTES (variable-length strings) is not supported in ABI v1 frames.
const (
	Invalid DType = 0
	BOOL    DType = 1
	UINT8   DType = 2
	UINT16  DType = 3
	UINT32  DType = 4
	UINT64  DType = 5
	INT8    DType = 6
	INT16   DType = 7
	INT32   DType = 8
	INT64   DType = 9
	FP16    DType = 10
	FP32    DType = 11
	FP64    DType = 12
)

// ErrInvalid is wrapped by every error about a malformed tensor, frame or
// OIP value, so callers can answer "bad request" without parsing messages.
var ErrInvalid = errors.New("invalid tensor")

var dtypeNames = [...]string{
	Invalid: "INVALID",
	BOOL:    "BOOL",
	UINT8:   "UINT8",
	UINT16:  "UINT16",
	UINT32:  "UINT32",
	UINT64:  "UINT64",
	INT8:    "INT8",
	INT16:   "INT16",
	INT32:   "INT32",
	INT64:   "INT64",
	FP16:    "FP16",
	FP32:    "FP32",
	FP64:    "FP64",
}

var dtypeSizes = [...]int{
	BOOL: 1, UINT8: 1, UINT16: 2, UINT32: 4, UINT64: 8,
	INT8: 1, INT16: 2, INT32: 4, INT64: 8,
	FP16: 2, FP32: 4, FP64: 8,
}

// String returns the OIP datatype name, e.g. "FP32".
func (d DType) String() string {
	if d.Valid() {
		return dtypeNames[d]
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// Valid reports whether d is one of the defined element types.
func (d DType) Valid() bool { return d > Invalid && int(d) < len(dtypeNames) }

// Size returns the size of one element in bytes, or 0 for an invalid type.
func (d DType) Size() int {
	if d.Valid() {
		return dtypeSizes[d]
	}
	return 0
}

// ParseDType maps an OIP datatype name ("FP32", "INT64", ...) to its DType.
func ParseDType(s string) (DType, error) {
	for i, n := range dtypeNames {
		if i > 0 && n == s {
			return DType(i), nil
		}
	}
	return Invalid, fmt.Errorf("%w: datatype %q is not supported; use one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64", ErrInvalid, s)
}

// Limits that keep a hostile shape from overflowing arithmetic or memory.
const (
	// MaxRank is the most dimensions a tensor may have.
	MaxRank = 32
	// MaxNameLen is the longest tensor name, in bytes.
	MaxNameLen = 1024
)

// Tensor is a named, typed, shaped block of little-endian row-major data.
type Tensor struct {
	Name  string
	DType DType
	// Shape holds the dimensions; every dimension is >= 0. An empty shape is
	// a scalar with one element.
	Shape []int64
	// Data holds NumElements(Shape) * DType.Size() bytes, little-endian,
	// row-major.
	Data []byte
}

// NumElements returns the product of shape's dimensions, or an error if a
// dimension is negative or the product does not fit comfortably in memory
// arithmetic (it is capped at MaxFrame elements).
func NumElements(shape []int64) (int64, error) {
	if len(shape) > MaxRank {
		return 0, fmt.Errorf("%w: rank %d is over the limit of %d", ErrInvalid, len(shape), MaxRank)
	}
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("%w: shape %v has a negative dimension; concrete tensors need every dimension >= 0", ErrInvalid, shape)
		}
		if d == 0 {
			n = 0
			continue
		}
		if n > MaxFrame/d {
			return 0, fmt.Errorf("%w: shape %v has more than %d elements", ErrInvalid, shape, int64(MaxFrame))
		}
		n *= d
	}
	return n, nil
}

// Validate checks that t's name, dtype, shape and data length agree.
func (t Tensor) Validate() error {
	if t.Name == "" || len(t.Name) > MaxNameLen {
		return fmt.Errorf("%w: tensor name must be 1 to %d bytes, got %d", ErrInvalid, MaxNameLen, len(t.Name))
	}
	if !utf8.ValidString(t.Name) {
		return fmt.Errorf("%w: tensor name %q is not valid UTF-8", ErrInvalid, t.Name)
	}
	if !t.DType.Valid() {
		return fmt.Errorf("%w: tensor %q has unknown dtype %s", ErrInvalid, t.Name, t.DType)
	}
	n, err := NumElements(t.Shape)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	if want := n * int64(t.DType.Size()); int64(len(t.Data)) != want {
		return fmt.Errorf("%w: tensor %q: shape %v of %s needs %d data bytes, got %d", ErrInvalid, t.Name, t.Shape, t.DType, want, len(t.Data))
	}
	if t.DType == BOOL {
		for i, b := range t.Data {
			if b > 1 {
				return fmt.Errorf("%w: tensor %q: BOOL element %d is %d; use 0 or 1", ErrInvalid, t.Name, i, b)
			}
		}
	}
	return nil
}

// FromFloat32 builds an FP32 tensor. It does not check that shape matches
// len(v); Validate or EncodeFrame will.
func FromFloat32(name string, shape []int64, v []float32) Tensor {
	data := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(x))
	}
	return Tensor{Name: name, DType: FP32, Shape: append([]int64(nil), shape...), Data: data}
}

// FromFloat64 builds a tensor of dtype d from float64 values, converting
// each value exactly or failing: an integer or BOOL element must be a whole
// number within the type's range (BOOL takes 0 or 1). It is how JSON golden
// vectors, whose numbers are float64, become typed tensors.
func FromFloat64(name string, d DType, shape []int64, v []float64) (Tensor, error) {
	if !d.Valid() {
		return Tensor{}, fmt.Errorf("%w: tensor %q: unknown dtype %s", ErrInvalid, name, d)
	}
	n, err := NumElements(shape)
	if err != nil {
		return Tensor{}, fmt.Errorf("tensor %q: %w", name, err)
	}
	if n != int64(len(v)) {
		return Tensor{}, fmt.Errorf("%w: tensor %q: shape %v holds %d elements, got %d values", ErrInvalid, name, shape, n, len(v))
	}
	t := Tensor{Name: name, DType: d, Shape: append([]int64(nil), shape...), Data: make([]byte, len(v)*d.Size())}
	for i, x := range v {
		if err := putFloat(t.Data, d, i, x); err != nil {
			return Tensor{}, fmt.Errorf("tensor %q element %d: %w", name, i, err)
		}
	}
	return t, nil
}

// integer ranges as float64; the upper bounds are exclusive because
// float64(MaxInt64) rounds up to 2^63.
var intRange = map[DType][2]float64{
	BOOL:   {0, 2},
	UINT8:  {0, 1 << 8},
	UINT16: {0, 1 << 16},
	UINT32: {0, 1 << 32},
	UINT64: {0, 1 << 64},
	INT8:   {-1 << 7, 1 << 7},
	INT16:  {-1 << 15, 1 << 15},
	INT32:  {-1 << 31, 1 << 31},
	INT64:  {-1 << 63, 1 << 63},
}

// putFloat stores x as element i of data, which holds dtype d.
func putFloat(data []byte, d DType, i int, x float64) error {
	switch d {
	case FP64:
		binary.LittleEndian.PutUint64(data[8*i:], math.Float64bits(x))
		return nil
	case FP32:
		if !math.IsInf(x, 0) && !math.IsNaN(x) && math.Abs(x) > math.MaxFloat32 {
			return fmt.Errorf("%w: %g overflows FP32", ErrInvalid, x)
		}
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(float32(x)))
		return nil
	case FP16:
		h, ok := float32ToHalf(float32(x))
		if !ok {
			return fmt.Errorf("%w: %g overflows FP16", ErrInvalid, x)
		}
		binary.LittleEndian.PutUint16(data[2*i:], h)
		return nil
	}
	r := intRange[d]
	if x != math.Trunc(x) || x < r[0] || x >= r[1] {
		return fmt.Errorf("%w: %g is not a valid %s value", ErrInvalid, x, d)
	}
	switch d {
	case BOOL, UINT8:
		data[i] = uint8(x)
	case INT8:
		data[i] = uint8(int8(x))
	case UINT16:
		binary.LittleEndian.PutUint16(data[2*i:], uint16(x))
	case INT16:
		binary.LittleEndian.PutUint16(data[2*i:], uint16(int16(x)))
	case UINT32:
		binary.LittleEndian.PutUint32(data[4*i:], uint32(x))
	case INT32:
		binary.LittleEndian.PutUint32(data[4*i:], uint32(int32(x)))
	case UINT64:
		binary.LittleEndian.PutUint64(data[8*i:], uint64(x))
	case INT64:
		binary.LittleEndian.PutUint64(data[8*i:], uint64(int64(x)))
	}
	return nil
}

// float reads element i of data (dtype d) as float64. 64-bit integers
// beyond 2^53 lose precision, as they must in a float64.
func float(data []byte, d DType, i int) float64 {
	switch d {
	case BOOL, UINT8:
		return float64(data[i])
	case INT8:
		return float64(int8(data[i]))
	case UINT16:
		return float64(binary.LittleEndian.Uint16(data[2*i:]))
	case INT16:
		return float64(int16(binary.LittleEndian.Uint16(data[2*i:])))
	case UINT32:
		return float64(binary.LittleEndian.Uint32(data[4*i:]))
	case INT32:
		return float64(int32(binary.LittleEndian.Uint32(data[4*i:])))
	case UINT64:
		return float64(binary.LittleEndian.Uint64(data[8*i:]))
	case INT64:
		return float64(int64(binary.LittleEndian.Uint64(data[8*i:])))
	case FP16:
		return float64(halfToFloat32(binary.LittleEndian.Uint16(data[2*i:])))
	case FP32:
		return float64(math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:])))
	case FP64:
		return math.Float64frombits(binary.LittleEndian.Uint64(data[8*i:]))
	}
	return math.NaN()
}

// Len returns the number of elements in t as implied by its data.
func (t Tensor) Len() int {
	if s := t.DType.Size(); s > 0 {
		return len(t.Data) / s
	}
	return 0
}

func (t Tensor) checkData() error {
	s := t.DType.Size()
	if s == 0 {
		return fmt.Errorf("%w: tensor %q has unknown dtype %s", ErrInvalid, t.Name, t.DType)
	}
	if len(t.Data)%s != 0 {
		return fmt.Errorf("%w: tensor %q: %d data bytes is not a whole number of %s elements", ErrInvalid, t.Name, len(t.Data), t.DType)
	}
	return nil
}

// Float32s returns t's elements converted to float32, whatever t's numeric
// dtype (BOOL gives 0 and 1).
func (t Tensor) Float32s() ([]float32, error) {
	if err := t.checkData(); err != nil {
		return nil, err
	}
	out := make([]float32, t.Len())
	if t.DType == FP32 {
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
		}
		return out, nil
	}
	for i := range out {
		out[i] = float32(float(t.Data, t.DType, i))
	}
	return out, nil
}

// Float64s returns t's elements converted to float64, whatever t's numeric
// dtype (BOOL gives 0 and 1).
func (t Tensor) Float64s() ([]float64, error) {
	if err := t.checkData(); err != nil {
		return nil, err
	}
	out := make([]float64, t.Len())
	for i := range out {
		out[i] = float(t.Data, t.DType, i)
	}
	return out, nil
}

// halfToFloat32 converts an IEEE 754 binary16 value.
func halfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	frac := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f: // inf or NaN
		return math.Float32frombits(sign | 0xff<<23 | frac<<13)
	case exp == 0 && frac == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal: value = frac * 2^-24
		f := float32(frac) * (1.0 / (1 << 24))
		if sign != 0 {
			f = -f
		}
		return f
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | frac<<13)
}

// float32ToHalf converts to binary16 with round-to-nearest-even; ok is
// false when a finite value overflows.
func float32ToHalf(f float32) (h uint16, ok bool) {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	frac := b & 0x7fffff
	if exp == 0xff { // inf or NaN; keep NaN a NaN
		if frac != 0 {
			return sign | 0x7e00, true
		}
		return sign | 0x7c00, true
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return 0, false
	}
	if e <= 0 {
		if e < -10 {
			return sign, true // underflows to zero
		}
		m := frac | 0x800000
		shift := uint32(14 - e)
		half := m >> shift
		rem := m & (1<<shift - 1)
		mid := uint32(1) << (shift - 1)
		if rem > mid || (rem == mid && half&1 == 1) {
			half++
		}
		return sign | uint16(half), true
	}
	half := uint32(e)<<10 | frac>>13
	rem := frac & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && half&1 == 1) {
		half++
	}
	if half >= 0x7c00 {
		return 0, false
	}
	return sign | uint16(half), true
}
