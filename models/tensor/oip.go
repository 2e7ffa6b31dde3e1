package tensor

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"
)

// OIPTensor is a tensor in the Open Inference Protocol v2 JSON shape, as
// found in the inputs of an inference request and the outputs of its
// response. Data is kept raw so that it can be flat or nested.
type OIPTensor struct {
	Name       string          `json:"name"`
	Shape      []int64         `json:"shape"`
	Datatype   string          `json:"datatype"`
	Data       json.RawMessage `json:"data"`
	Parameters map[string]any  `json:"parameters,omitempty"`
}

// RequestOutput names one output a client wants in the response.
type RequestOutput struct {
	Name       string         `json:"name"`
	Parameters map[string]any `json:"parameters,omitempty"`
}

// InferRequest is the body of POST /v2/models/{name}/infer.
type InferRequest struct {
	ID         string          `json:"id,omitempty"`
	Parameters map[string]any  `json:"parameters,omitempty"`
	Inputs     []OIPTensor     `json:"inputs"`
	Outputs    []RequestOutput `json:"outputs,omitempty"`
}

// InferResponse is the body answering an InferRequest.
type InferResponse struct {
	ModelName    string         `json:"model_name"`
	ModelVersion string         `json:"model_version"`
	ID           string         `json:"id,omitempty"`
	Parameters   map[string]any `json:"parameters,omitempty"`
	Outputs      []OIPTensor    `json:"outputs"`
}

// MaxOIPData caps the raw JSON of one OIP tensor's data, in bytes.
const MaxOIPData = 4 * MaxFrame

// FromOIP converts an OIP JSON tensor to a Tensor. Data may be flat
// (row-major, as many elements as the shape holds) or nested arrays that
// follow the shape exactly. Numbers must fit the datatype exactly: an
// integer type takes only whole numbers in range, BOOL takes only true and
// false. In floating-point data (FP16, FP32, FP64) a JSON null is a missing
// value and becomes NaN, which is how models see missing values (a
// compiled tree follows its split's default direction); JSON has no NaN
// literal, and OIP names no other way to send one. Other datatypes refuse
// null. The shape must be concrete (no -1).
func FromOIP(o OIPTensor) (Tensor, error) {
	d, err := ParseDType(o.Datatype)
	if err != nil {
		return Tensor{}, fmt.Errorf("input %q: %w", o.Name, err)
	}
	n, err := NumElements(o.Shape)
	if err != nil {
		return Tensor{}, fmt.Errorf("input %q: %w", o.Name, err)
	}
	if n*int64(d.Size()) > MaxFrame {
		return Tensor{}, fmt.Errorf("%w: input %q: shape %v of %s is over the %d byte limit", ErrInvalid, o.Name, o.Shape, d, MaxFrame)
	}
	if len(o.Data) > MaxOIPData {
		return Tensor{}, fmt.Errorf("%w: input %q: data is %d bytes of JSON, over the %d byte limit", ErrInvalid, o.Name, len(o.Data), MaxOIPData)
	}
	t := Tensor{Name: o.Name, DType: d, Shape: append([]int64{}, o.Shape...), Data: make([]byte, int(n)*d.Size())}
	p := oipParser{dec: json.NewDecoder(bytes.NewReader(o.Data)), t: &t, n: int(n)}
	p.dec.UseNumber()
	if err := p.parse(); err != nil {
		return Tensor{}, fmt.Errorf("input %q: %w", o.Name, err)
	}
	if err := t.Validate(); err != nil {
		return Tensor{}, err
	}
	return t, nil
}

// oipParser streams the tokens of OIP data straight into a tensor's bytes,
// so a large request never becomes a tree of boxed values.
type oipParser struct {
	dec       *json.Decoder
	t         *Tensor
	n         int // elements the shape holds
	leaves    int // elements read so far
	leafDepth int // depth of the first leaf, -1 before it
	maxDepth  int
}

func (p *oipParser) parse() error {
	p.leafDepth = -1
	tok, err := p.dec.Token()
	if err != nil {
		return fmt.Errorf("%w: data is not valid JSON: %v", ErrInvalid, err)
	}
	if tok == json.Delim('[') {
		outer, err := p.array(1)
		if err != nil {
			return err
		}
		if p.maxDepth > 1 && outer != int(p.t.Shape[0]) {
			return fmt.Errorf("%w: nested data has %d rows, shape %v wants %d", ErrInvalid, outer, p.t.Shape, p.t.Shape[0])
		}
	} else {
		if len(p.t.Shape) != 0 {
			return fmt.Errorf("%w: data must be an array for shape %v", ErrInvalid, p.t.Shape)
		}
		if err := p.leaf(tok, 0); err != nil {
			return err
		}
	}
	if _, err := p.dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: data has more JSON after its array", ErrInvalid)
	}
	if p.leaves != p.n {
		return fmt.Errorf("%w: data has %d elements, shape %v holds %d", ErrInvalid, p.leaves, p.t.Shape, p.n)
	}
	if p.maxDepth > 1 && p.maxDepth != len(p.t.Shape) {
		return fmt.Errorf("%w: data is nested %d deep, shape %v has rank %d; nest it as the shape or send it flat", ErrInvalid, p.maxDepth, p.t.Shape, len(p.t.Shape))
	}
	return nil
}

// array reads the elements of an array whose '[' was just read, at depth
// (1 = outermost), and returns how many it had.
func (p *oipParser) array(depth int) (int, error) {
	if depth > MaxRank {
		return 0, fmt.Errorf("%w: data is nested deeper than %d", ErrInvalid, MaxRank)
	}
	p.maxDepth = max(p.maxDepth, depth)
	count := 0
	for {
		tok, err := p.dec.Token()
		if err != nil {
			return 0, fmt.Errorf("%w: data is not valid JSON: %v", ErrInvalid, err)
		}
		switch tok {
		case json.Delim(']'):
			// Inner arrays exist only in nested form, where each one must
			// match its dimension.
			if depth > 1 {
				if depth > len(p.t.Shape) || count != int(p.t.Shape[depth-1]) {
					return 0, fmt.Errorf("%w: nested data does not follow shape %v: an array at depth %d has %d elements", ErrInvalid, p.t.Shape, depth, count)
				}
			}
			return count, nil
		case json.Delim('['):
			if p.leafDepth == depth {
				return 0, fmt.Errorf("%w: data mixes numbers and arrays at one level", ErrInvalid)
			}
			if _, err := p.array(depth + 1); err != nil {
				return 0, err
			}
		default:
			if err := p.leaf(tok, depth); err != nil {
				return 0, err
			}
		}
		count++
	}
}

func (p *oipParser) leaf(tok json.Token, depth int) error {
	if p.leafDepth < 0 {
		p.leafDepth = depth
	} else if p.leafDepth != depth {
		return fmt.Errorf("%w: data mixes numbers and arrays at one level", ErrInvalid)
	}
	if p.maxDepth > depth {
		return fmt.Errorf("%w: data mixes numbers and arrays at one level", ErrInvalid)
	}
	if p.leaves >= p.n {
		return fmt.Errorf("%w: data has more elements than shape %v holds (%d)", ErrInvalid, p.t.Shape, p.n)
	}
	if err := putToken(p.t.Data, p.t.DType, p.leaves, tok); err != nil {
		return fmt.Errorf("element %d: %w", p.leaves, err)
	}
	p.leaves++
	return nil
}

// putToken stores one JSON scalar as element i of data (dtype d), parsing
// integers as integers so INT64 and UINT64 keep every bit.
func putToken(data []byte, d DType, i int, tok json.Token) error {
	if b, ok := tok.(bool); ok {
		if d != BOOL {
			return fmt.Errorf("%w: %v is not a %s value", ErrInvalid, b, d)
		}
		data[i] = 0
		if b {
			data[i] = 1
		}
		return nil
	}
	if tok == nil { // JSON null: a missing value
		switch d {
		case FP16, FP32, FP64:
			return putFloat(data, d, i, math.NaN())
		}
		return fmt.Errorf("%w: null (a missing value) is not a %s value; only FP16, FP32 and FP64 data can hold missing values", ErrInvalid, d)
	}
	num, ok := tok.(json.Number)
	if !ok {
		return fmt.Errorf("%w: %v is not a number", ErrInvalid, tok)
	}
	s := string(num)
	switch d {
	case BOOL:
		return fmt.Errorf("%w: %s is not a BOOL value; use true or false", ErrInvalid, s)
	case FP16, FP32, FP64:
		bits := 64
		if d == FP32 {
			bits = 32
		}
		x, err := strconv.ParseFloat(s, bits)
		if err != nil {
			return fmt.Errorf("%w: %s does not fit %s", ErrInvalid, s, d)
		}
		return putFloat(data, d, i, x)
	case UINT64:
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return fmt.Errorf("%w: %s is not a UINT64 value", ErrInvalid, s)
		}
		binary.LittleEndian.PutUint64(data[8*i:], v)
		return nil
	default:
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("%w: %s is not a %s value", ErrInvalid, s, d)
		}
		if d == INT64 {
			binary.LittleEndian.PutUint64(data[8*i:], uint64(v))
			return nil
		}
		return putFloat(data, d, i, float64(v))
	}
}

// ToOIP converts a Tensor to the OIP JSON shape, with flat data.
func ToOIP(t Tensor) (OIPTensor, error) {
	if err := t.Validate(); err != nil {
		return OIPTensor{}, err
	}
	buf := make([]byte, 0, 2+t.Len()*8)
	buf = append(buf, '[')
	for i := 0; i < t.Len(); i++ {
		if i > 0 {
			buf = append(buf, ',')
		}
		switch t.DType {
		case BOOL:
			buf = strconv.AppendBool(buf, t.Data[i] == 1)
		case UINT64:
			buf = strconv.AppendUint(buf, binary.LittleEndian.Uint64(t.Data[8*i:]), 10)
		case INT64:
			buf = strconv.AppendInt(buf, int64(binary.LittleEndian.Uint64(t.Data[8*i:])), 10)
		case FP16, FP32, FP64:
			x := float(t.Data, t.DType, i)
			if math.IsNaN(x) || math.IsInf(x, 0) {
				return OIPTensor{}, fmt.Errorf("%w: output %q element %d is %v, which JSON cannot carry", ErrInvalid, t.Name, i, x)
			}
			bits := 64
			if t.DType != FP64 {
				bits = 32
			}
			buf = strconv.AppendFloat(buf, x, 'g', -1, bits)
		default:
			buf = strconv.AppendInt(buf, int64(float(t.Data, t.DType, i)), 10)
		}
	}
	buf = append(buf, ']')
	return OIPTensor{Name: t.Name, Shape: append([]int64{}, t.Shape...), Datatype: t.DType.String(), Data: buf}, nil
}
