package onnx

import (
	"encoding/binary"
	"fmt"
	"math"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// The ONNX protobuf messages, as far as this package reads them. Field
// numbers are onnx.proto's.

type modelProto struct {
	irVersion int64
	producer  string
	opsets    map[string]int64
	graph     *graphProto
	props     map[string]string
}

type graphProto struct {
	nodes   []nodeProto
	inits   []tensorProto
	inputs  []valueInfo
	outputs []valueInfo
}

type nodeProto struct {
	name, op, domain string
	inputs, outputs  []string
	attrs            []attribute
}

type attribute struct {
	name string
	typ  int64
	f    float32
	i    int64
	hasF bool
	hasI bool
}

type valueInfo struct {
	name     string
	elemType int64
	dims     []dim
	hasShape bool
}

// dim is one dimension of a declared shape: a fixed size, or a symbolic
// (free) one.
type dim struct {
	value int64
	fixed bool
}

type tensorProto struct {
	name     string
	dims     []int64
	dataType int64
	floats   []float32
	raw      []byte
	external bool
	segment  bool
}

// ONNX TensorProto.DataType codes used here.
const (
	dataTypeFloat = 1
)

func str(f field, what string) (string, error) {
	if err := f.want(protowire.BytesType, what); err != nil {
		return "", err
	}
	if !utf8.Valid(f.Bytes) {
		return "", fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, what)
	}
	return string(f.Bytes), nil
}

func parseModel(b []byte) (*modelProto, error) {
	m := &modelProto{opsets: map[string]int64{}, props: map[string]string{}}
	err := eachField(b, "ModelProto", func(f field) error {
		var err error
		switch f.Num {
		case 1:
			if err = f.want(protowire.VarintType, "ir_version"); err == nil {
				m.irVersion = int64(f.Int)
			}
		case 2:
			m.producer, err = str(f, "producer_name")
		case 7:
			if err = f.want(protowire.BytesType, "graph"); err == nil {
				if m.graph != nil {
					return fmt.Errorf("%w: two graphs", ErrInvalid)
				}
				m.graph, err = parseGraph(f.Bytes)
			}
		case 8:
			if err = f.want(protowire.BytesType, "opset_import"); err == nil {
				var domain string
				var version int64
				err = eachField(f.Bytes, "opset_import", func(g field) error {
					var err error
					switch g.Num {
					case 1:
						domain, err = str(g, "opset domain")
					case 2:
						if err = g.want(protowire.VarintType, "opset version"); err == nil {
							version = int64(g.Int)
						}
					}
					return err
				})
				m.opsets[domain] = version
			}
		case 14:
			if err = f.want(protowire.BytesType, "metadata_props"); err == nil {
				var k, v string
				err = eachField(f.Bytes, "metadata_props", func(g field) error {
					var err error
					switch g.Num {
					case 1:
						k, err = str(g, "metadata key")
					case 2:
						v, err = str(g, "metadata value")
					}
					return err
				})
				m.props[k] = v
			}
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}

func parseGraph(b []byte) (*graphProto, error) {
	g := &graphProto{}
	err := eachField(b, "GraphProto", func(f field) error {
		if f.Num == 1 || f.Num == 5 || f.Num == 11 || f.Num == 12 || f.Num == 15 {
			if err := f.want(protowire.BytesType, "graph field"); err != nil {
				return err
			}
		}
		switch f.Num {
		case 1:
			if len(g.nodes) >= MaxNodes {
				return fmt.Errorf("%w: more than %d nodes", ErrUnsupported, MaxNodes)
			}
			n, err := parseNode(f.Bytes)
			if err != nil {
				return err
			}
			g.nodes = append(g.nodes, n)
		case 5:
			if len(g.inits) >= MaxNodes {
				return fmt.Errorf("%w: more than %d initializers", ErrUnsupported, MaxNodes)
			}
			t, err := parseTensor(f.Bytes)
			if err != nil {
				return err
			}
			g.inits = append(g.inits, t)
		case 11, 12:
			if len(g.inputs)+len(g.outputs) >= MaxNodes {
				return fmt.Errorf("%w: more than %d graph inputs and outputs", ErrUnsupported, MaxNodes)
			}
			v, err := parseValueInfo(f.Bytes)
			if err != nil {
				return err
			}
			if f.Num == 11 {
				g.inputs = append(g.inputs, v)
			} else {
				g.outputs = append(g.outputs, v)
			}
		case 15:
			return fmt.Errorf("%w: sparse initializers are not supported", ErrUnsupported)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return g, nil
}

func parseNode(b []byte) (nodeProto, error) {
	var n nodeProto
	err := eachField(b, "NodeProto", func(f field) error {
		var err error
		var s string
		switch f.Num {
		case 1:
			if s, err = str(f, "node input"); err == nil {
				if len(n.inputs) >= 16 {
					return fmt.Errorf("%w: a node has more than 16 inputs", ErrUnsupported)
				}
				n.inputs = append(n.inputs, s)
			}
		case 2:
			if s, err = str(f, "node output"); err == nil {
				if len(n.outputs) >= 16 {
					return fmt.Errorf("%w: a node has more than 16 outputs", ErrUnsupported)
				}
				n.outputs = append(n.outputs, s)
			}
		case 3:
			n.name, err = str(f, "node name")
		case 4:
			n.op, err = str(f, "op_type")
		case 7:
			n.domain, err = str(f, "node domain")
		case 5:
			if err = f.want(protowire.BytesType, "attribute"); err == nil {
				if len(n.attrs) >= 64 {
					return fmt.Errorf("%w: a node has more than 64 attributes", ErrUnsupported)
				}
				var a attribute
				a, err = parseAttribute(f.Bytes)
				n.attrs = append(n.attrs, a)
			}
		}
		return err
	})
	return n, err
}

func parseAttribute(b []byte) (attribute, error) {
	var a attribute
	err := eachField(b, "AttributeProto", func(f field) error {
		var err error
		switch f.Num {
		case 1:
			a.name, err = str(f, "attribute name")
		case 20:
			if err = f.want(protowire.VarintType, "attribute type"); err == nil {
				a.typ = int64(f.Int)
			}
		case 2:
			if err = f.want(protowire.Fixed32Type, "attribute f"); err == nil {
				a.f, a.hasF = math.Float32frombits(uint32(f.Int)), true
			}
		case 3:
			if err = f.want(protowire.VarintType, "attribute i"); err == nil {
				a.i, a.hasI = int64(f.Int), true
			}
		}
		return err
	})
	return a, err
}

func parseValueInfo(b []byte) (valueInfo, error) {
	var v valueInfo
	err := eachField(b, "ValueInfoProto", func(f field) error {
		var err error
		switch f.Num {
		case 1:
			v.name, err = str(f, "value name")
		case 2:
			if err = f.want(protowire.BytesType, "value type"); err != nil {
				return err
			}
			// TypeProto: only tensor_type (1) is of use; a sequence or map
			// leaves elemType 0 and is refused later, by name.
			err = eachField(f.Bytes, "TypeProto", func(t field) error {
				if t.Num != 1 {
					return nil
				}
				if err := t.want(protowire.BytesType, "tensor_type"); err != nil {
					return err
				}
				return eachField(t.Bytes, "TypeProto.Tensor", func(tt field) error {
					switch tt.Num {
					case 1:
						if err := tt.want(protowire.VarintType, "elem_type"); err != nil {
							return err
						}
						v.elemType = int64(tt.Int)
					case 2:
						if err := tt.want(protowire.BytesType, "shape"); err != nil {
							return err
						}
						v.hasShape = true
						return eachField(tt.Bytes, "TensorShapeProto", func(s field) error {
							if s.Num != 1 {
								return nil
							}
							if err := s.want(protowire.BytesType, "dim"); err != nil {
								return err
							}
							if len(v.dims) >= 64 {
								return fmt.Errorf("%w: value %q has more than 64 dimensions", ErrUnsupported, v.name)
							}
							var d dim
							err := eachField(s.Bytes, "Dimension", func(x field) error {
								if x.Num == 1 {
									if err := x.want(protowire.VarintType, "dim_value"); err != nil {
										return err
									}
									d = dim{value: int64(x.Int), fixed: true}
								}
								return nil
							})
							v.dims = append(v.dims, d)
							return err
						})
					}
					return nil
				})
			})
		}
		return err
	})
	return v, err
}

func parseTensor(b []byte) (tensorProto, error) {
	var t tensorProto
	err := eachField(b, "TensorProto", func(f field) error {
		var err error
		switch f.Num {
		case 1:
			t.dims, err = f.varints(t.dims, "tensor dims", 64)
		case 2:
			if err = f.want(protowire.VarintType, "data_type"); err == nil {
				t.dataType = int64(f.Int)
			}
		case 3:
			t.segment = true
		case 4:
			t.floats, err = f.floats(t.floats, "float_data", MaxWeights)
		case 8:
			t.name, err = str(f, "tensor name")
		case 9:
			if err = f.want(protowire.BytesType, "raw_data"); err == nil {
				t.raw = f.Bytes
			}
		case 13:
			t.external = true
		case 14:
			if err = f.want(protowire.VarintType, "data_location"); err == nil && f.Int == 1 {
				t.external = true
			}
		}
		return err
	})
	return t, err
}

// values returns the tensor's elements as float32, checking the element
// count against the dims.
func (t *tensorProto) values() ([]float32, error) {
	if t.external {
		return nil, fmt.Errorf("%w: initializer %q keeps its data in an external file; save the model with its weights inside (onnx.save(model, path, save_as_external_data=False))", ErrUnsupported, t.name)
	}
	if t.segment {
		return nil, fmt.Errorf("%w: initializer %q is segmented", ErrUnsupported, t.name)
	}
	if t.dataType != dataTypeFloat {
		return nil, fmt.Errorf("%w: initializer %q has data type %d; only float32 (1) is supported", ErrUnsupported, t.name, t.dataType)
	}
	n := int64(1)
	for _, d := range t.dims {
		if d < 0 || d > MaxWeights || n*d > MaxWeights {
			return nil, fmt.Errorf("%w: initializer %q has dims %v: negative, or more than %d elements", ErrInvalid, t.name, t.dims, MaxWeights)
		}
		n *= d
	}
	var vals []float32
	switch {
	case t.raw != nil:
		if int64(len(t.raw)) != 4*n {
			return nil, fmt.Errorf("%w: initializer %q has %d raw bytes for dims %v (%d floats); the file is truncated or corrupted", ErrInvalid, t.name, len(t.raw), t.dims, n)
		}
		vals = make([]float32, n)
		for i := range vals {
			vals[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.raw[4*i:]))
		}
	default:
		if int64(len(t.floats)) != n {
			return nil, fmt.Errorf("%w: initializer %q has %d floats for dims %v (%d); the file is truncated or corrupted", ErrInvalid, t.name, len(t.floats), t.dims, n)
		}
		vals = t.floats
	}
	return vals, nil
}
