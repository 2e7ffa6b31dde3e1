// Package compiler turns trained model files into model bundles: a manifest
// plus a WebAssembly module that speaks Model ABI v1 (models/ABI.md),
// written directly as bytecode (models/compiler/wasm) with no toolchain
// beyond this repository.
//
// Sources: XGBoost JSON tree ensembles (models/compiler/xgboost) and ONNX
// linear models and small dense networks (models/compiler/onnx). The
// modules import nothing, hold their weights in their data section, and
// compute in float32 with float64 where rounding would show (dot products,
// exp), so their predictions match the training library's within 1e-5.
//
// The manifest is filled from the model: input and output schema, class
// labels, golden test vectors from the source library's own predictions,
// and reference histograms for drift from a sample of inputs
// (bundle.Reference). The module's metadata (ef_metadata) repeats the
// labels, and adds feature and output column names; the reference
// histograms stay out of the module, which they would only make bigger.
package compiler

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler/onnx"
	"github.com/edgefleet/edgefleet/models/compiler/xgboost"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// ABIVersion is the Model ABI the compiled modules speak.
const ABIVersion = 1

// Platform is the metadata "platform" of compiled modules.
const Platform = "edgefleet-compiler"

// Format is a source model format.
type Format string

// Source formats.
const (
	XGBoost Format = "xgboost"
	ONNX    Format = "onnx"
)

// Formats lists the formats Load reads.
var Formats = []Format{XGBoost, ONNX}

// ParseFormat maps a --from value to a Format.
func ParseFormat(s string) (Format, error) {
	for _, f := range Formats {
		if string(f) == s {
			return f, nil
		}
	}
	return "", fmt.Errorf("model format %q is not supported; use xgboost (an XGBoost JSON model) or onnx", s)
}

// ErrMismatch is wrapped by errors where the files given with a model
// (test outputs, tables) disagree with it.
var ErrMismatch = errors.New("model and data disagree")

// Model is a parsed source model.
type Model struct {
	Format Format
	// Exactly one of XGBoost and ONNX is set.
	XGBoost *xgboost.Model
	ONNX    *onnx.Model
	// Features names the input columns; the module's input is one FP32
	// tensor [rows, len(Features)].
	Features []string
	// InputName is the input tensor's name.
	InputName string
	// Outputs are the module's output tensors.
	Outputs []Output
	// Labels names the classes, if the model file does.
	Labels []string
	// Library says what wrote the file, if it says.
	Library string
	// Objective is XGBoost's objective, or empty.
	Objective string
}

// Output is one output tensor: Width columns per row, rank 1 ([rows]) or
// 2 ([rows, Width]). Probability marks outputs in [0, 1] (sigmoid or
// softmax), whose drift histograms get fixed bins.
type Output struct {
	Name        string
	Width       int
	Rank        int
	Probability bool
}

// LoadFile reads and parses a model file of the given format.
func LoadFile(format Format, path string) (*Model, error) {
	switch format {
	case XGBoost:
		x, err := xgboost.ReadFile(path)
		if err != nil {
			return nil, err
		}
		return fromXGBoost(x), nil
	case ONNX:
		o, err := onnx.ReadFile(path)
		if err != nil {
			return nil, err
		}
		return fromONNX(o), nil
	}
	_, err := ParseFormat(string(format))
	return nil, err
}

// Load parses a model of the given format from memory.
func Load(format Format, data []byte) (*Model, error) {
	switch format {
	case XGBoost:
		x, err := xgboost.Parse(data)
		if err != nil {
			return nil, err
		}
		return fromXGBoost(x), nil
	case ONNX:
		o, err := onnx.Parse(data)
		if err != nil {
			return nil, err
		}
		return fromONNX(o), nil
	}
	_, err := ParseFormat(string(format))
	return nil, err
}

func fromXGBoost(x *xgboost.Model) *Model {
	m := &Model{Format: XGBoost, XGBoost: x, Features: x.Features, InputName: "input", Objective: x.Objective}
	if x.Version != "" {
		m.Library = "xgboost " + x.Version
	}
	switch x.Transform {
	case xgboost.Sigmoid:
		m.Outputs = []Output{{Name: "probability", Width: 1, Rank: 1, Probability: true}}
	case xgboost.Softmax:
		m.Outputs = []Output{{Name: "probabilities", Width: x.Groups, Rank: 2, Probability: true}}
	default:
		m.Outputs = []Output{{Name: "prediction", Width: 1, Rank: 1}}
	}
	return m
}

func fromONNX(o *onnx.Model) *Model {
	m := &Model{Format: ONNX, ONNX: o, InputName: o.Values[o.Input].Name, Labels: o.Labels, Library: o.Producer}
	m.Features = o.Features
	if m.Features == nil {
		m.Features = make([]string, o.NumFeatures())
		for i := range m.Features {
			m.Features[i] = "f" + strconv.Itoa(i)
		}
	}
	producer := map[int]onnx.Kind{}
	for _, st := range o.Steps {
		producer[st.Out] = st.Kind
	}
	for _, v := range o.Outputs {
		k, ok := producer[v]
		m.Outputs = append(m.Outputs, Output{
			Name: o.Values[v].Name, Width: o.Values[v].Width, Rank: 2,
			Probability: ok && (k == onnx.Softmax || k == onnx.Sigmoid),
		})
	}
	return m
}

// Columns names the output columns in order, as `fleet model predict`
// prints them: the output's name when it has one column, name[i] else.
func (m *Model) Columns() []string {
	var cols []string
	for _, o := range m.Outputs {
		if o.Width == 1 {
			cols = append(cols, o.Name)
			continue
		}
		for i := 0; i < o.Width; i++ {
			cols = append(cols, fmt.Sprintf("%s[%d]", o.Name, i))
		}
	}
	return cols
}

// WeightBytes is the size of the model's parameters in their most compact
// plain form: for a dense model 4 bytes per float32 weight and bias; for a
// tree ensemble, per split its feature index, threshold and both child
// indices (4 bytes each) and its missing-value direction (1 byte), and per
// leaf its value (4 bytes) — what an evaluator walking node arrays needs.
func (m *Model) WeightBytes() int {
	if m.ONNX != nil {
		return 4 * m.ONNX.NumWeights()
	}
	n := 0
	for i := range m.XGBoost.Trees {
		s, l := m.XGBoost.Trees[i].Splits()
		n += 17*s + 4*l
	}
	return n
}

// Predictor evaluates the model natively in Go, computing what the
// compiled module computes. It is not safe for concurrent use.
type Predictor struct {
	m       *Model
	scratch *onnx.Scratch
}

// NewPredictor returns a native evaluator of m.
func (m *Model) NewPredictor() *Predictor {
	p := &Predictor{m: m}
	if m.ONNX != nil {
		p.scratch = m.ONNX.NewScratch()
	}
	return p
}

// Predict writes row's output columns (len(Columns())) into out.
func (p *Predictor) Predict(row, out []float32) {
	if p.m.XGBoost != nil {
		p.m.XGBoost.Predict(row, out)
		return
	}
	outs := p.m.ONNX.Predict(p.scratch, row)
	k := 0
	for _, o := range outs {
		k += copy(out[k:], o)
	}
}

// Options say what to build.
type Options struct {
	// Name and Version of the model (bundle naming rules apply).
	Name, Version string
	Description   string
	// InputName overrides the input tensor's name.
	InputName string
	// Labels override the class labels the model file gives, if any.
	Labels []string
	// Reference is a sample of inputs; the reference histograms of drift
	// are computed from it (and from the model's outputs on it).
	Reference *Table
	// TestInputs and TestOutputs are rows of inputs and the source
	// library's predictions for them; the first MaxTests complete rows
	// (no missing value) become golden test vectors.
	TestInputs, TestOutputs *Table
	// MaxTests caps the golden vectors; 0 means DefaultTests.
	MaxTests int
	// Limits go into the manifest; a zero MemoryPages becomes the
	// module's static memory plus BatchPages.
	Limits bundle.Limits
}

// BatchPages is the memory (in 64 KiB pages) a bundle's default limit
// allows beyond the module's own static memory, for the host's input and
// output buffers: 16 MiB, room for batches of frames of a few MiB.
const BatchPages = 256

// DefaultTests is how many golden vectors a bundle gets by default.
const DefaultTests = 8

// Result is a compiled bundle and what it is made of.
type Result struct {
	Bundle   *bundle.Bundle
	Metadata Metadata
	// ModuleBytes is the module's size; WeightBytes the model's (see
	// Model.WeightBytes).
	ModuleBytes, WeightBytes int
	// Tests is the number of golden vectors in the manifest.
	Tests int
}

// Metadata is what a compiled module's ef_metadata returns: OIP model
// metadata plus what the compiler knows about the model.
type Metadata struct {
	Name     string        `json:"name"`
	Version  string        `json:"version"`
	Platform string        `json:"platform"`
	Inputs   []tensor.Spec `json:"inputs"`
	Outputs  []tensor.Spec `json:"outputs"`
	// Source describes the model file.
	Source SourceInfo `json:"source"`
	// Features names the input columns.
	Features []string `json:"features"`
	// Columns names the output columns (see Model.Columns).
	Columns []string `json:"columns"`
	// Labels names the classes: one per column of a probabilities output,
	// or two (negative, positive) for a single probability.
	Labels []string `json:"labels,omitempty"`
}

// SourceInfo describes the model file a module was compiled from.
type SourceInfo struct {
	Format    Format `json:"format"`
	Library   string `json:"library,omitempty"`
	Objective string `json:"objective,omitempty"`
}

// Compile builds the bundle of m.
func Compile(m *Model, o Options) (*Result, error) {
	inputName := m.InputName
	if o.InputName != "" {
		inputName = o.InputName
	}
	if inputName == "" || len(inputName) > tensor.MaxNameLen {
		return nil, fmt.Errorf("input name %q: use 1 to %d bytes", inputName, tensor.MaxNameLen)
	}
	for _, out := range m.Outputs {
		if out.Name == inputName {
			return nil, fmt.Errorf("output %q has the input's name; set another input name", out.Name)
		}
	}
	labels := m.DefaultLabels()
	if o.Labels != nil {
		labels = o.Labels
	}
	if err := checkLabels(m, labels); err != nil {
		return nil, err
	}
	md := Metadata{
		Name: o.Name, Version: o.Version, Platform: Platform,
		Inputs:   []tensor.Spec{{Name: inputName, Datatype: "FP32", Shape: []int64{-1, int64(len(m.Features))}}},
		Source:   SourceInfo{Format: m.Format, Library: m.Library, Objective: m.Objective},
		Features: m.Features, Columns: m.Columns(), Labels: labels,
	}
	for _, out := range m.Outputs {
		shape := []int64{-1}
		if out.Rank == 2 {
			shape = append(shape, int64(out.Width))
		}
		md.Outputs = append(md.Outputs, tensor.Spec{Name: out.Name, Datatype: "FP32", Shape: shape})
	}
	var ref *bundle.Reference
	if o.Reference != nil {
		var err error
		if ref, err = NewReference(m, o.Reference); err != nil {
			return nil, err
		}
	}
	tests, err := goldens(m, inputName, o)
	if err != nil {
		return nil, err
	}
	meta, err := json.Marshal(md)
	if err != nil {
		return nil, err
	}

	b := newBuilder()
	a := abi{inputName: inputName, features: len(m.Features), metadata: meta}
	for _, out := range m.Outputs {
		a.outputs = append(a.outputs, outputDecl{name: out.Name, width: out.Width, rank: out.Rank})
	}
	if m.XGBoost != nil {
		a.row = b.compileTrees(m.XGBoost)
	} else {
		a.row = b.compileGraph(m.ONNX)
	}
	var pages uint32
	a.pages = &pages
	module := b.finish(a)
	if o.Limits.MemoryPages == 0 {
		o.Limits.MemoryPages = pages + BatchPages
	}

	man := bundle.Manifest{
		ABI: ABIVersion, Name: o.Name, Version: o.Version, Description: o.Description,
		Limits: o.Limits, Tests: tests, Labels: labels, Reference: ref,
	}
	for _, s := range md.Inputs {
		man.Inputs = append(man.Inputs, bundle.TensorSpec(s))
	}
	for _, s := range md.Outputs {
		man.Outputs = append(man.Outputs, bundle.TensorSpec(s))
	}
	bd, err := bundle.New(man, module)
	if err != nil {
		return nil, err
	}
	return &Result{Bundle: bd, Metadata: md, ModuleBytes: len(module), WeightBytes: m.WeightBytes(), Tests: len(tests)}, nil
}

// DefaultLabels returns the class labels of a model with no --labels: the
// ones the model file names (an ONNX model's "labels" metadata); else, for
// an XGBoost classifier, the class ids XGBoost itself uses ("0", "1", ...:
// two for binary:logistic, one per class for multi:softprob); else none.
func (m *Model) DefaultLabels() []string {
	if m.Labels != nil {
		return m.Labels
	}
	if m.XGBoost == nil {
		return nil
	}
	n := 0
	switch m.XGBoost.Transform {
	case xgboost.Sigmoid:
		n = 2
	case xgboost.Softmax:
		n = m.XGBoost.Groups
	}
	var labels []string
	for i := 0; i < n; i++ {
		labels = append(labels, strconv.Itoa(i))
	}
	return labels
}

func checkLabels(m *Model, labels []string) error {
	if len(labels) == 0 {
		return nil
	}
	seen := map[string]bool{}
	for _, l := range labels {
		if l == "" || seen[l] {
			return fmt.Errorf("class labels %q: each label must be non-empty and distinct", labels)
		}
		seen[l] = true
	}
	w := m.Outputs[0].Width
	if len(labels) == w || (w == 1 && len(labels) == 2) {
		return nil
	}
	return fmt.Errorf("%d class labels for output %q of %d columns; give one label per column (or two, negative then positive, for a single probability)",
		len(labels), m.Outputs[0].Name, w)
}

// Tolerance returns the tolerance of a golden vector whose largest
// expected magnitude is mx: 1e-5, relative above 1.
func Tolerance(mx float64) float64 { return 1e-5 * math.Max(1, mx) }

// goldens picks the golden vectors and checks the model reproduces them
// natively, so a mismatched pair of files fails here, plainly, rather than
// at activation.
func goldens(m *Model, inputName string, o Options) ([]bundle.TestVector, error) {
	if o.TestInputs == nil && o.TestOutputs == nil {
		return nil, nil
	}
	if o.TestInputs == nil || o.TestOutputs == nil {
		return nil, errors.New("golden vectors need both test inputs and test outputs")
	}
	in, err := o.TestInputs.Select(m.Features)
	if err != nil {
		return nil, err
	}
	cols := m.Columns()
	want, err := o.TestOutputs.Select(cols)
	if err != nil {
		return nil, fmt.Errorf("test outputs: %w", err)
	}
	if len(in) != len(want) {
		return nil, fmt.Errorf("%w: %s has %d rows but %s has %d; give the library's prediction for every test input",
			ErrMismatch, o.TestInputs.Source, len(in), o.TestOutputs.Source, len(want))
	}
	limit := o.MaxTests
	if limit == 0 {
		limit = DefaultTests
	}
	p := m.NewPredictor()
	got := make([]float32, len(cols))
	var tests []bundle.TestVector
	for r := 0; r < len(in) && len(tests) < limit; r++ {
		if hasNaN(in[r]) || hasNaN(want[r]) {
			continue // JSON, hence a manifest, cannot hold NaN
		}
		mx := 0.0
		for _, v := range want[r] {
			mx = math.Max(mx, math.Abs(float64(v)))
		}
		tol := Tolerance(mx)
		p.Predict(in[r], got)
		for c := range cols {
			if d := math.Abs(float64(got[c]) - float64(want[r][c])); !(d <= tol) {
				return nil, fmt.Errorf("%w: row %d (line %d of %s): the model computes %v for %s, %s says %v; are these the model's own predictions for these inputs?",
					ErrMismatch, r+1, o.TestOutputs.Lines[r], o.TestOutputs.Source, got[c], cols[c], o.TestOutputs.Source, want[r][c])
			}
		}
		tv := bundle.TestVector{
			Inputs:    []bundle.TensorValue{{Name: inputName, Datatype: "FP32", Shape: []int64{1, int64(len(m.Features))}, Data: floats64(in[r])}},
			Tolerance: tol,
		}
		c := 0
		for _, out := range m.Outputs {
			shape := []int64{1}
			if out.Rank == 2 {
				shape = append(shape, int64(out.Width))
			}
			tv.Outputs = append(tv.Outputs, bundle.TensorValue{Name: out.Name, Datatype: "FP32", Shape: shape, Data: floats64(want[r][c : c+out.Width])})
			c += out.Width
		}
		tests = append(tests, tv)
	}
	if len(tests) == 0 && len(in) > 0 {
		return nil, fmt.Errorf("%s has no row without missing values to make a golden vector of", o.TestInputs.Source)
	}
	return tests, nil
}

func hasNaN(v []float32) bool {
	for _, x := range v {
		if x != x {
			return true
		}
	}
	return false
}

func floats64(v []float32) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}

// WriteBundle writes the bundle file atomically (temporary file, rename),
// so a reader never sees half of it.
func WriteBundle(path string, b *bundle.Bundle) error {
	data, err := b.Encode()
	if err != nil {
		return err
	}
	tmp := path + ".part"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
