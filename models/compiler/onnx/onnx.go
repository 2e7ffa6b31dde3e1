// Package onnx reads small dense networks and linear models from ONNX files
// and evaluates them natively.
//
// It parses the ONNX protobuf with the protobuf wire reader (no generated
// ONNX code) and lowers the graph into a list of row-wise steps over float32
// vectors. Supported: one float32 input of shape [batch, features], the
// operators Gemm (transA=0, constant B and C), MatMul (constant right
// operand), Add (a constant broadcast over the row, or two values of the
// same width), Relu, Sigmoid, Tanh and Softmax (last axis). Every other
// operator, data type or shape is refused with an error naming the node.
//
// Every supported operator maps one input row to one output row, so a model
// runs row by row in a fixed amount of scratch memory, whatever the batch.
//
// The native evaluator (Predict) is the reference the compiled modules are
// tested and benchmarked against; it computes exactly what they compute:
// float32 values between steps, dot products accumulated in float64 and
// rounded once, activations computed in float64 and rounded.
package onnx

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
)

// Limits on what Parse accepts.
const (
	// MaxFileSize is the largest model file read.
	MaxFileSize = 64 << 20
	// MaxNodes is the most graph nodes (and initializers).
	MaxNodes = 4096
	// MaxWidth is the widest row a value may have.
	MaxWidth = 1 << 16
	// MaxWeights is the most float32 elements of one initializer.
	MaxWeights = MaxFileSize / 4
	// MaxValues is the most float32 elements of all the values of a row
	// together: the scratch memory one row needs.
	MaxValues = 1 << 22
)

// Errors that callers may branch on.
var (
	// ErrInvalid: the file is not a well-formed ONNX model.
	ErrInvalid = errors.New("invalid onnx model")
	// ErrUnsupported: a well-formed model uses an operator, type or shape
	// this package does not support.
	ErrUnsupported = errors.New("unsupported onnx model")
)

// Supported lists the operators this package compiles.
var Supported = []string{"Gemm", "MatMul", "Add", "Relu", "Sigmoid", "Tanh", "Softmax"}

// Kind is the kind of a lowered step.
type Kind int

// Step kinds.
const (
	// Dense: out[j] = f32(sum_i in[i]*W[j][i]) (times Alpha) + Bias[j].
	Dense Kind = iota
	// AddConst: out[j] = in[j] + C[j].
	AddConst
	// AddValues: out[j] = in[j] + in2[j].
	AddValues
	// Relu: out[j] = max(in[j], 0).
	Relu
	// Sigmoid: out[j] = 1/(1+exp(-in[j])).
	Sigmoid
	// Tanh: out[j] = tanh(in[j]).
	Tanh
	// Softmax: out = exp(in - max)/sum(exp(in - max)).
	Softmax
)

// Step is one row-wise operation.
type Step struct {
	Kind Kind
	// Node and Op name the ONNX node the step comes from.
	Node, Op string
	// In, In2 and Out are value indices.
	In, In2, Out int
	// W is Dense's weight matrix, [out][in] row-major.
	W []float32
	// Alpha scales Dense's product; 1 for none.
	Alpha float32
	// Bias is Dense's bias (nil for none); C is AddConst's constant.
	Bias, C []float32
}

// Value is a row vector the graph computes.
type Value struct {
	Name  string
	Width int
}

// Model is a lowered ONNX graph.
type Model struct {
	// Values holds every value; Values[Input] is the graph input.
	Values []Value
	Input  int
	// Outputs are the graph outputs, in order.
	Outputs []int
	Steps   []Step
	// Features and Labels come from the metadata_props "feature_names"
	// and "labels" (a JSON list of strings, or comma-separated).
	Features, Labels []string
	// Props are all metadata_props.
	Props map[string]string
	// Producer and Opset describe the file.
	Producer string
	Opset    int64
}

// NumFeatures returns the input width.
func (m *Model) NumFeatures() int { return m.Values[m.Input].Width }

// NumWeights returns the number of float32 parameters over all steps.
func (m *Model) NumWeights() int {
	n := 0
	for _, s := range m.Steps {
		n += len(s.W) + len(s.Bias) + len(s.C)
	}
	return n
}

// ReadFile reads and parses a model file, naming it in any error.
func ReadFile(path string) (*Model, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	m, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// Parse parses an ONNX model and lowers its graph.
func Parse(data []byte) (*Model, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("%w: %d bytes, over the %d byte limit", ErrInvalid, len(data), MaxFileSize)
	}
	mp, err := parseModel(data)
	if err != nil {
		return nil, err
	}
	if mp.graph == nil {
		return nil, fmt.Errorf("%w: no graph (is this an ONNX model file?)", ErrInvalid)
	}
	m := &Model{Props: mp.props, Producer: mp.producer}
	var ok bool
	if m.Opset, ok = mp.opsets[""]; !ok {
		m.Opset, ok = mp.opsets["ai.onnx"]
	}
	if !ok {
		return nil, fmt.Errorf("%w: no opset_import for the default ONNX domain", ErrInvalid)
	}
	if err := m.lower(mp.graph); err != nil {
		return nil, err
	}
	if m.Features, err = listProp(mp.props, "feature_names"); err != nil {
		return nil, err
	}
	if m.Features != nil && len(m.Features) != m.NumFeatures() {
		return nil, fmt.Errorf("%w: metadata feature_names lists %d names for %d input features", ErrInvalid, len(m.Features), m.NumFeatures())
	}
	if m.Labels, err = listProp(mp.props, "labels"); err != nil {
		return nil, err
	}
	return m, nil
}

func listProp(props map[string]string, key string) ([]string, error) {
	s, ok := props[key]
	if !ok {
		return nil, nil
	}
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "[") {
		var l []string
		if err := json.Unmarshal([]byte(s), &l); err != nil {
			return nil, fmt.Errorf("%w: metadata %s is not a JSON list of strings: %v", ErrInvalid, key, err)
		}
		return l, nil
	}
	l := strings.Split(s, ",")
	for i := range l {
		l[i] = strings.TrimSpace(l[i])
	}
	return l, nil
}

// lowerer holds the state of one lowering.
type lowerer struct {
	m      *Model
	consts map[string]*tensorProto
	index  map[string]int
	total  int // sum of value widths
}

func (m *Model) lower(g *graphProto) error {
	lw := &lowerer{m: m, consts: map[string]*tensorProto{}, index: map[string]int{}}
	for i := range g.inits {
		t := &g.inits[i]
		if t.name == "" {
			return fmt.Errorf("%w: initializer %d has no name", ErrInvalid, i)
		}
		lw.consts[t.name] = t
	}
	// Before IR version 4 initializers were also listed as inputs; the
	// real input is the one that is not an initializer.
	var real []valueInfo
	for _, in := range g.inputs {
		if _, ok := lw.consts[in.name]; !ok {
			real = append(real, in)
		}
	}
	if len(real) != 1 {
		names := make([]string, len(real))
		for i, r := range real {
			names[i] = r.name
		}
		return fmt.Errorf("%w: the graph has %d inputs %v; want exactly one float32 input of shape [batch, features]", ErrUnsupported, len(real), names)
	}
	in := real[0]
	if in.elemType != dataTypeFloat {
		return fmt.Errorf("%w: input %q has element type %d; only float32 (1) is supported", ErrUnsupported, in.name, in.elemType)
	}
	if !in.hasShape || len(in.dims) != 2 || !in.dims[1].fixed || in.dims[1].value <= 0 || in.dims[1].value > MaxWidth {
		return fmt.Errorf("%w: input %q must have shape [batch, N] with a fixed N from 1 to %d (got %s)", ErrUnsupported, in.name, MaxWidth, shapeString(in))
	}
	if in.name == "" {
		return fmt.Errorf("%w: the input has no name", ErrInvalid)
	}
	m.Input = lw.define(in.name, int(in.dims[1].value))
	for i, n := range g.nodes {
		if err := lw.node(i, n); err != nil {
			return err
		}
	}
	if len(g.outputs) == 0 {
		return fmt.Errorf("%w: the graph has no outputs", ErrInvalid)
	}
	seen := map[string]bool{}
	for _, o := range g.outputs {
		idx, ok := lw.index[o.name]
		if !ok {
			return fmt.Errorf("%w: graph output %q is not computed by any node", ErrInvalid, o.name)
		}
		if seen[o.name] {
			return fmt.Errorf("%w: graph output %q is listed twice", ErrInvalid, o.name)
		}
		seen[o.name] = true
		if o.elemType != 0 && o.elemType != dataTypeFloat {
			return fmt.Errorf("%w: output %q has element type %d; only float32 (1) is supported", ErrUnsupported, o.name, o.elemType)
		}
		w := m.Values[idx].Width
		if o.hasShape && len(o.dims) == 2 && o.dims[1].fixed && int(o.dims[1].value) != w {
			return fmt.Errorf("%w: output %q is declared [batch, %d] but the graph computes %d columns", ErrInvalid, o.name, o.dims[1].value, w)
		}
		m.Outputs = append(m.Outputs, idx)
	}
	return nil
}

func shapeString(v valueInfo) string {
	if !v.hasShape {
		return "no shape"
	}
	parts := make([]string, len(v.dims))
	for i, d := range v.dims {
		if d.fixed {
			parts[i] = fmt.Sprint(d.value)
		} else {
			parts[i] = "?"
		}
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

func (lw *lowerer) define(name string, width int) int {
	lw.m.Values = append(lw.m.Values, Value{Name: name, Width: width})
	lw.index[name] = len(lw.m.Values) - 1
	return len(lw.m.Values) - 1
}

// value returns the index of a computed value, refusing a constant or an
// unknown name.
func (lw *lowerer) value(node, name string) (int, error) {
	if i, ok := lw.index[name]; ok {
		return i, nil
	}
	if _, ok := lw.consts[name]; ok {
		return 0, fmt.Errorf("%w: node %q: operand %q is a constant where the row input was expected", ErrUnsupported, node, name)
	}
	return 0, fmt.Errorf("%w: node %q uses %q before any node computes it (the graph is not topologically sorted, or the name is wrong)", ErrInvalid, node, name)
}

func (n nodeProto) attr(name string) (attribute, bool) {
	for _, a := range n.attrs {
		if a.name == name {
			return a, true
		}
	}
	return attribute{}, false
}

func (n nodeProto) intAttr(name string, def int64) int64 {
	if a, ok := n.attr(name); ok && a.hasI {
		return a.i
	}
	return def
}

func (n nodeProto) floatAttr(name string, def float32) float32 {
	if a, ok := n.attr(name); ok && a.hasF {
		return a.f
	}
	return def
}

func (lw *lowerer) node(i int, n nodeProto) error {
	name := n.name
	if name == "" {
		name = fmt.Sprintf("#%d", i)
	}
	if n.domain != "" && n.domain != "ai.onnx" {
		return fmt.Errorf("%w: node %q: operator %s of domain %q is not supported; supported are %s of the default domain",
			ErrUnsupported, name, n.op, n.domain, strings.Join(Supported, ", "))
	}
	arity := map[string][2]int{"Gemm": {2, 3}, "MatMul": {2, 2}, "Add": {2, 2}, "Relu": {1, 1}, "Sigmoid": {1, 1}, "Tanh": {1, 1}, "Softmax": {1, 1}}
	ar, ok := arity[n.op]
	if !ok {
		return fmt.Errorf("%w: node %q: operator %s is not supported; supported are %s", ErrUnsupported, name, n.op, strings.Join(Supported, ", "))
	}
	// Optional inputs may be given as "".
	for len(n.inputs) > 0 && n.inputs[len(n.inputs)-1] == "" {
		n.inputs = n.inputs[:len(n.inputs)-1]
	}
	if len(n.inputs) < ar[0] || len(n.inputs) > ar[1] {
		return fmt.Errorf("%w: node %q: %s has %d inputs, want %d to %d", ErrInvalid, name, n.op, len(n.inputs), ar[0], ar[1])
	}
	if len(n.outputs) != 1 || n.outputs[0] == "" {
		return fmt.Errorf("%w: node %q: %s must have exactly one named output, has %d", ErrUnsupported, name, n.op, len(n.outputs))
	}
	out := n.outputs[0]
	if _, dup := lw.index[out]; dup {
		return fmt.Errorf("%w: node %q: value %q is computed twice", ErrInvalid, name, out)
	}
	if _, dup := lw.consts[out]; dup {
		return fmt.Errorf("%w: node %q: output %q has the name of an initializer", ErrInvalid, name, out)
	}
	in, err := lw.value(name, n.inputs[0])
	if n.op == "Add" && err != nil {
		// Add is commutative: the constant may come first.
		if _, isConst := lw.consts[n.inputs[0]]; isConst {
			n.inputs[0], n.inputs[1] = n.inputs[1], n.inputs[0]
			in, err = lw.value(name, n.inputs[0])
		}
	}
	if err != nil {
		return err
	}
	width := lw.m.Values[in].Width
	st := Step{Node: name, Op: n.op, In: in, In2: -1}
	switch n.op {
	case "Gemm", "MatMul":
		if err := lw.dense(&st, n, width); err != nil {
			return err
		}
		width = len(st.W) / width
	case "Add":
		if j, ok := lw.index[n.inputs[1]]; ok {
			if w := lw.m.Values[j].Width; w != width {
				return fmt.Errorf("%w: node %q: Add of %q (%d columns) and %q (%d columns)", ErrUnsupported, name, n.inputs[0], width, n.inputs[1], w)
			}
			st.Kind, st.In2 = AddValues, j
		} else {
			c, err := lw.broadcast(name, n.inputs[1], width, 1)
			if err != nil {
				return err
			}
			st.Kind, st.C = AddConst, c
		}
	case "Relu":
		st.Kind = Relu
	case "Sigmoid":
		st.Kind = Sigmoid
	case "Tanh":
		st.Kind = Tanh
	case "Softmax":
		def := int64(-1)
		if lw.m.Opset < 13 {
			def = 1
		}
		if ax := n.intAttr("axis", def); ax != 1 && ax != -1 {
			return fmt.Errorf("%w: node %q: Softmax over axis %d; only the last axis (1 or -1) of a [batch, N] value is supported", ErrUnsupported, name, ax)
		}
		st.Kind = Softmax
	}
	if lw.total += width; lw.total > MaxValues {
		return fmt.Errorf("%w: node %q: the graph's values need more than %d floats per row", ErrUnsupported, name, MaxValues)
	}
	st.Out = lw.define(out, width)
	lw.m.Steps = append(lw.m.Steps, st)
	return nil
}

// dense fills a Gemm or MatMul step: W becomes [out][in].
func (lw *lowerer) dense(st *Step, n nodeProto, width int) error {
	st.Kind, st.Alpha = Dense, 1
	transB := false
	if n.op == "Gemm" {
		if n.intAttr("transA", 0) != 0 {
			return fmt.Errorf("%w: node %q: Gemm with transA=1 mixes rows; only transA=0 is supported", ErrUnsupported, st.Node)
		}
		transB = n.intAttr("transB", 0) != 0
		st.Alpha = n.floatAttr("alpha", 1)
	}
	bname := n.inputs[1]
	b, ok := lw.consts[bname]
	if !ok {
		return fmt.Errorf("%w: node %q: %s operand B %q must be a constant (an initializer)", ErrUnsupported, st.Node, n.op, bname)
	}
	vals, err := b.values()
	if err != nil {
		return fmt.Errorf("node %q: %w", st.Node, err)
	}
	if len(b.dims) != 2 {
		return fmt.Errorf("%w: node %q: %s operand B %q has dims %v; want a matrix", ErrUnsupported, st.Node, n.op, bname, b.dims)
	}
	rows, cols := int(b.dims[0]), int(b.dims[1])
	k, outW := rows, cols
	if transB {
		k, outW = cols, rows
	}
	if k != width {
		return fmt.Errorf("%w: node %q: %s of a %d-column value by %q of dims %v (transB=%v): the inner dimensions differ", ErrInvalid, st.Node, n.op, width, bname, b.dims, transB)
	}
	if outW <= 0 || outW > MaxWidth {
		return fmt.Errorf("%w: node %q: output width %d outside 1..%d", ErrUnsupported, st.Node, outW, MaxWidth)
	}
	st.W = make([]float32, k*outW)
	for j := 0; j < outW; j++ {
		for i := 0; i < k; i++ {
			if transB {
				st.W[j*k+i] = vals[j*cols+i]
			} else {
				st.W[j*k+i] = vals[i*cols+j]
			}
		}
	}
	if n.op == "Gemm" && len(n.inputs) == 3 {
		c, err := lw.broadcast(st.Node, n.inputs[2], outW, n.floatAttr("beta", 1))
		if err != nil {
			return err
		}
		st.Bias = c
	}
	return nil
}

// broadcast returns constant name as a row of width elements, each scaled
// by scale (in float32, as the operator specifies): a scalar, [1], [width]
// or [1, width].
func (lw *lowerer) broadcast(node, name string, width int, scale float32) ([]float32, error) {
	t, ok := lw.consts[name]
	if !ok {
		return nil, fmt.Errorf("%w: node %q: operand %q is neither a computed value nor a constant", ErrInvalid, node, name)
	}
	vals, err := t.values()
	if err != nil {
		return nil, fmt.Errorf("node %q: %w", node, err)
	}
	shapeOK := false
	switch len(t.dims) {
	case 0:
		shapeOK = true
	case 1:
		shapeOK = t.dims[0] == 1 || t.dims[0] == int64(width)
	case 2:
		shapeOK = t.dims[0] == 1 && (t.dims[1] == 1 || t.dims[1] == int64(width))
	}
	if !shapeOK {
		return nil, fmt.Errorf("%w: node %q: constant %q of dims %v does not broadcast over a row of %d; want a scalar, [%d] or [1, %d]", ErrUnsupported, node, name, t.dims, width, width, width)
	}
	out := make([]float32, width)
	for j := range out {
		v := vals[0]
		if len(vals) == width {
			v = vals[j]
		}
		if scale != 1 {
			v *= scale
		}
		out[j] = v
	}
	return out, nil
}

// Scratch holds the row buffers of one Predict caller; reuse it across rows.
type Scratch struct {
	vals [][]float32
	outs [][]float32
}

// NewScratch returns buffers for m.
func (m *Model) NewScratch() *Scratch {
	s := &Scratch{vals: make([][]float32, len(m.Values)), outs: make([][]float32, len(m.Outputs))}
	for i, v := range m.Values {
		if i != m.Input {
			s.vals[i] = make([]float32, v.Width)
		}
	}
	return s
}

// Predict evaluates one row x and returns the graph outputs' rows; they
// alias s and are overwritten by the next call.
func (m *Model) Predict(s *Scratch, x []float32) [][]float32 {
	s.vals[m.Input] = x
	for i := range m.Steps {
		st := &m.Steps[i]
		in, out := s.vals[st.In], s.vals[st.Out]
		switch st.Kind {
		case Dense:
			k := len(in)
			for j := range out {
				w := st.W[j*k : j*k+k]
				acc := 0.0
				for i, x := range in {
					acc += float64(x) * float64(w[i])
				}
				v := float32(acc)
				if st.Alpha != 1 {
					v *= st.Alpha
				}
				if st.Bias != nil {
					v += st.Bias[j]
				}
				out[j] = v
			}
		case AddConst:
			for j := range out {
				out[j] = in[j] + st.C[j]
			}
		case AddValues:
			in2 := s.vals[st.In2]
			for j := range out {
				out[j] = in[j] + in2[j]
			}
		case Relu:
			for j, x := range in {
				if x < 0 {
					x = 0
				}
				out[j] = x
			}
		case Sigmoid:
			for j, x := range in {
				out[j] = float32(1 / (1 + math.Exp(-float64(x))))
			}
		case Tanh:
			for j, x := range in {
				out[j] = float32(math.Tanh(float64(x)))
			}
		case Softmax:
			mx := math.Inf(-1)
			for _, x := range in {
				mx = math.Max(mx, float64(x))
			}
			sum := 0.0
			for _, x := range in {
				sum += math.Exp(float64(x) - mx)
			}
			for j, x := range in {
				out[j] = float32(math.Exp(float64(x)-mx) / sum)
			}
		}
	}
	for i, o := range m.Outputs {
		s.outs[i] = s.vals[o]
	}
	return s.outs
}
