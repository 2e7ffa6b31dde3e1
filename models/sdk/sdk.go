// Package sdk turns a Go function into an Edgefleet model: a WebAssembly
// module that speaks Model ABI v1 (models/ABI.md).
//
// A model author writes a package main with an empty main and registers the
// model from init:
//
//	func main() {}
//
//	func init() {
//		sdk.Register(sdk.Model{
//			Name: "grid-anomaly", Version: version,
//			Inputs:  []tensor.Spec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}},
//			Outputs: []tensor.Spec{{Name: "score", Datatype: "FP32", Shape: []int64{-1}}},
//			Infer:   score,
//		})
//	}
//
// and builds it as a WASI reactor:
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o model.wasm .
//
// The package exports ef_abi_version, ef_alloc, ef_infer, ef_last_error and
// ef_metadata with //go:wasmexport when built for wasip1. Elsewhere only
// the portable part compiles, so the model's own logic can be tested with a
// plain `go test`.
package sdk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"

	"github.com/edgefleet/edgefleet/models/tensor"
)

// ABIVersion is the Model ABI version this SDK implements.
const ABIVersion = 1

// Codes returned by ef_infer (models/ABI.md).
const (
	CodeBadInput       = -1
	CodeOutputTooSmall = -2
	CodeInternal       = -3
)

// ErrBadInput marks an error from Model.Infer that is the caller's fault;
// ef_infer reports it as "bad input" (-1) instead of an internal error (-3).
// Errors wrapping tensor.ErrInvalid count as bad input too.
var ErrBadInput = errors.New("bad input")

// Model is what a guest registers.
type Model struct {
	// Name and Version must equal the bundle manifest's.
	Name    string
	Version string
	// Inputs and Outputs declare the tensors; ef_infer checks inputs
	// against them before calling Infer, and outputs after.
	Inputs  []tensor.Spec
	Outputs []tensor.Spec
	// Infer computes the outputs. It must be a pure function of its input.
	// The input tensors' Data is only valid during the call.
	Infer func(in []tensor.Tensor) ([]tensor.Tensor, error)
}

var registered *runtime

// Register installs the model. Call it once, from init. It panics on a
// second call or an invalid model, which makes the module fail to load
// with the message on stderr: both are programming errors.
func Register(m Model) {
	if registered != nil {
		panic("sdk.Register called twice; a module holds one model")
	}
	r, err := newRuntime(m)
	if err != nil {
		panic(err)
	}
	registered = r
}

// runtime holds one registered model and the guest side of the ABI. It
// works on byte slices so that it can be tested natively; the wasip1 file
// maps linear-memory pointers onto those slices.
type runtime struct {
	model   Model
	meta    []byte
	lastErr string
	allocs  [][]byte
}

func newRuntime(m Model) (*runtime, error) {
	if m.Name == "" || m.Version == "" {
		return nil, errors.New("sdk: model needs a Name and a Version")
	}
	if m.Infer == nil {
		return nil, fmt.Errorf("sdk: model %s has no Infer function", m.Name)
	}
	if len(m.Inputs) == 0 || len(m.Outputs) == 0 {
		return nil, fmt.Errorf("sdk: model %s must declare at least one input and one output", m.Name)
	}
	for _, s := range append(append([]tensor.Spec{}, m.Inputs...), m.Outputs...) {
		if err := s.Validate(); err != nil {
			return nil, fmt.Errorf("sdk: model %s: %w", m.Name, err)
		}
	}
	return &runtime{model: m, meta: metadataJSON(m)}, nil
}

// alloc returns a fresh buffer that stays reachable (and, Go's collector
// being non-moving, at a fixed address) for the life of the instance.
func (r *runtime) alloc(size int) []byte {
	if size <= 0 {
		size = 1
	}
	b := make([]byte, size)
	r.allocs = append(r.allocs, b)
	return b
}

func (r *runtime) fail(code int32, err error) int32 {
	r.lastErr = err.Error()
	return code
}

// infer runs one ABI call: decode in, check, run the model, encode into out.
func (r *runtime) infer(in, out []byte) int32 {
	if r.model.Infer == nil {
		return r.fail(CodeInternal, errors.New("no model registered: call sdk.Register from init"))
	}
	ts, err := tensor.DecodeFrame(in)
	if err != nil {
		return r.fail(CodeBadInput, err)
	}
	if err := tensor.CheckAll(r.model.Inputs, ts, "input"); err != nil {
		return r.fail(CodeBadInput, err)
	}
	res, err := r.call(ts)
	if err != nil {
		if errors.Is(err, ErrBadInput) || errors.Is(err, tensor.ErrInvalid) {
			return r.fail(CodeBadInput, err)
		}
		return r.fail(CodeInternal, err)
	}
	if err := tensor.CheckAll(r.model.Outputs, res, "output"); err != nil {
		return r.fail(CodeInternal, fmt.Errorf("model %s produced outputs that do not match its declaration: %w", r.model.Name, err))
	}
	size := tensor.FrameSize(res)
	if size > len(out) {
		if len(out) >= 4 {
			binary.LittleEndian.PutUint32(out, uint32(size))
		}
		return r.fail(CodeOutputTooSmall, fmt.Errorf("output frame needs %d bytes, buffer holds %d", size, len(out)))
	}
	// out[:0] has room for the whole frame, so AppendFrame writes in place.
	enc, err := tensor.AppendFrame(out[:0], res)
	if err != nil {
		return r.fail(CodeInternal, fmt.Errorf("encode outputs: %w", err))
	}
	return int32(len(enc))
}

// call runs the model's Infer, turning a panic into an internal error so
// one bad input does not cost the host an instance.
func (r *runtime) call(in []tensor.Tensor) (out []tensor.Tensor, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("model %s panicked: %v", r.model.Name, p)
		}
	}()
	return r.model.Infer(in)
}

func (r *runtime) lastError(out []byte) int32 {
	return int32(copy(out, r.lastErr))
}

func (r *runtime) metadata(out []byte) int32 {
	if len(r.meta) > len(out) {
		return r.fail(CodeOutputTooSmall, fmt.Errorf("metadata needs %d bytes, buffer holds %d", len(r.meta), len(out)))
	}
	return int32(copy(out, r.meta))
}

// find returns the sub-slice [ptr, ptr+n) of the allocation containing it;
// base gives an allocation's address.
func (r *runtime) find(ptr, n uint32, base func([]byte) uint32) ([]byte, bool) {
	for _, b := range r.allocs {
		start := base(b)
		if ptr >= start && uint64(ptr)+uint64(n) <= uint64(start)+uint64(len(b)) {
			off := ptr - start
			return b[off : off+n], true
		}
	}
	return nil, false
}

// metadataJSON writes ef_metadata's JSON by hand: encoding/json would add
// 400 KB to every guest, and every kilobyte of module costs compile time
// on the device.
func metadataJSON(m Model) []byte {
	b := []byte(`{"name":`)
	b = appendJSONString(b, m.Name)
	b = append(b, `,"version":`...)
	b = appendJSONString(b, m.Version)
	b = append(b, `,"inputs":`...)
	b = appendSpecs(b, m.Inputs)
	b = append(b, `,"outputs":`...)
	b = appendSpecs(b, m.Outputs)
	return append(b, '}')
}

func appendSpecs(b []byte, specs []tensor.Spec) []byte {
	b = append(b, '[')
	for i, s := range specs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"name":`...)
		b = appendJSONString(b, s.Name)
		b = append(b, `,"datatype":`...)
		b = appendJSONString(b, s.Datatype)
		b = append(b, `,"shape":[`...)
		for j, d := range s.Shape {
			if j > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, d, 10)
		}
		b = append(b, "]}"...)
	}
	return append(b, ']')
}

// appendJSONString quotes s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b = append(b, '\\', byte(r))
		case r < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[r>>4], hex[r&0xf])
		default:
			b = utf8.AppendRune(b, r)
		}
	}
	return append(b, '"')
}
