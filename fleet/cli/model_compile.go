package cli

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// runModelCompile is `fleet model build --from xgboost|onnx FILE`: it
// compiles a trained model file into a bundle, then loads the bundle in the
// agent's runtime so a module that does not reproduce its golden vectors
// is never written.
func runModelCompile(ctx context.Context, e *exec, from compiler.Format, args []string) error {
	fs := flag.NewFlagSet("fleet model build", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.String("from", string(from), "source kind: wasm, xgboost or onnx")
	modelPath := fs.String("model", "", "model file (or give it as the argument)")
	name := fs.String("name", "", "model name (required): 1-63 lowercase letters, digits, '.', '_' or '-'")
	version := fs.String("version", "", "model version (required), a semantic version such as 1.0.0")
	out := fs.String("out", "", "bundle file to write (required)")
	fs.StringVar(out, "o", "", "short for --out")
	fs.StringVar(out, "O", "", "short for --out")
	desc := fs.String("description", "", "manifest description")
	ref := fs.String("reference", "", "CSV sample of typical inputs: drift reference histograms (per feature on its deciles, per output on tenths or deciles)")
	testIn := fs.String("test-inputs", "", "CSV of inputs whose predictions by the training library are in --test-outputs")
	testOut := fs.String("test-outputs", "", "CSV of the training library's predictions for --test-inputs: golden test vectors")
	tests := fs.Int("tests", compiler.DefaultTests, "most golden vectors to keep (rows with missing values are skipped)")
	labels := fs.String("labels", "", "comma-separated class labels, index = class id (default: from the model file; XGBoost classifiers: 0,1,...)")
	inputName := fs.String("input-name", "", "input tensor name (default: input, or the ONNX graph's)")
	pages := fs.Uint("memory-pages", 0, "manifest limits.memoryPages (default: what the model needs plus 16 MiB for batches)")
	timeout := fs.Int("timeout-ms", 0, "manifest limits.timeoutMillis (default: the host's)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) == 1 && *modelPath == "":
		*modelPath = pos[0]
	case len(pos) > 0:
		return usageErr("want one model FILE, got %q", pos)
	}
	if *modelPath == "" || *name == "" || *version == "" || *out == "" {
		return usageErr("--from %s needs a model FILE, --name, --version and -o BUNDLE", from)
	}
	m, err := compiler.LoadFile(from, *modelPath)
	if err != nil {
		return err
	}
	o := compiler.Options{Name: *name, Version: *version, Description: *desc, InputName: *inputName, MaxTests: *tests}
	o.Limits.MemoryPages = uint32(*pages)
	o.Limits.TimeoutMillis = *timeout
	if *labels != "" {
		o.Labels = strings.Split(*labels, ",")
	}
	for _, t := range []struct {
		path string
		dst  **compiler.Table
	}{{*ref, &o.Reference}, {*testIn, &o.TestInputs}, {*testOut, &o.TestOutputs}} {
		if t.path == "" {
			continue
		}
		if *t.dst, err = compiler.ReadTableFile(t.path); err != nil {
			return err
		}
	}
	if (o.TestInputs == nil) != (o.TestOutputs == nil) {
		return usageErr("--test-inputs and --test-outputs go together")
	}
	res, err := compiler.Compile(m, o)
	if err != nil {
		return fmt.Errorf("%s: %w", *modelPath, err)
	}
	// Activate it as an agent would: compile, instantiate, golden vectors.
	h, err := host.New(ctx, host.Options{PoolSize: 1})
	if err != nil {
		return err
	}
	defer h.Close(context.WithoutCancel(ctx))
	start := time.Now()
	lm, err := h.Load(ctx, res.Bundle)
	if err != nil {
		return fmt.Errorf("the compiled bundle does not pass in the agent's runtime (a compiler bug; please report it with %s): %w", *modelPath, err)
	}
	activation := time.Since(start)
	_ = lm.Close(ctx)
	if err := compiler.WriteBundle(*out, res.Bundle); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "wrote %s: %s@%s sha256:%s\n", *out, res.Bundle.Manifest.Name, res.Bundle.Manifest.Version, res.Bundle.Digest)
	fmt.Fprintf(e.stdout, "  module %d bytes (weights %d bytes), %d golden vectors, activation %s\n",
		res.ModuleBytes, res.WeightBytes, res.Tests, activation.Round(10*time.Microsecond))
	man := res.Bundle.Manifest
	if len(man.Labels) > 0 {
		fmt.Fprintf(e.stdout, "  class labels %s\n", strings.Join(man.Labels, ","))
	}
	if r := man.Reference; r != nil {
		fmt.Fprintf(e.stdout, "  drift reference from %d rows: %d feature and %d output histograms\n", r.Rows, len(r.Features), len(r.Outputs))
	} else {
		fmt.Fprintln(e.stdout, "  note: no drift reference; pass --reference sample.csv (typical inputs) so rollouts can gate on drift")
	}
	if res.Tests == 0 {
		fmt.Fprintln(e.stdout, "  note: no golden vectors; pass --test-inputs and --test-outputs (the training library's predictions) so devices check the module before serving it")
	}
	return nil
}

// predictBatch is how many rows `fleet model predict` sends per call.
const predictBatch = 512

// runModelPredict is `fleet model predict BUNDLE --csv rows.csv`: it runs
// the bundle in the agent's runtime and prints one CSV row of outputs per
// input row.
func runModelPredict(ctx context.Context, e *exec, args []string) error {
	fs := flag.NewFlagSet("fleet model predict", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	csvPath := fs.String("csv", "", "input rows, one per line, optionally under a header naming the features; an empty cell is a missing value (required)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *csvPath == "" {
		return usageErr("want one BUNDLE and --csv rows.csv")
	}
	b, err := bundle.ReadFile(pos[0])
	if err != nil {
		return err
	}
	tab, err := compiler.ReadTableFile(*csvPath)
	if err != nil {
		return err
	}
	h, err := host.New(ctx, host.Options{PoolSize: 1})
	if err != nil {
		return err
	}
	defer h.Close(context.WithoutCancel(ctx))
	m, err := h.Load(ctx, b)
	if err != nil {
		return fmt.Errorf("bundle %s: %w", pos[0], err)
	}
	p, err := newPredictPlan(b.Manifest, m.Metadata())
	if err != nil {
		return fmt.Errorf("bundle %s: %w", pos[0], err)
	}
	rows, err := tab.Select(p.features)
	if err != nil {
		return err
	}
	w := csv.NewWriter(e.stdout)
	if err := w.Write(p.columns); err != nil {
		return err
	}
	for start := 0; start < len(rows); start += predictBatch {
		batch := rows[start:min(start+predictBatch, len(rows))]
		out, err := p.run(ctx, m, batch)
		if errors.Is(err, host.ErrBadInput) && len(batch) > 1 {
			// Find the row to blame.
			for i := range batch {
				if _, err := p.run(ctx, m, batch[i:i+1]); err != nil {
					return fmt.Errorf("%s line %d: %w", tab.Source, tab.Lines[start+i], err)
				}
			}
		}
		if err != nil {
			return fmt.Errorf("%s lines %d-%d: %w", tab.Source, tab.Lines[start], tab.Lines[start+len(batch)-1], err)
		}
		for _, r := range out {
			if err := w.Write(r); err != nil {
				return err
			}
		}
	}
	w.Flush()
	return w.Error()
}

// predictPlan maps CSV rows onto a bundle's one input and its outputs onto
// CSV columns.
type predictPlan struct {
	input    bundle.TensorSpec
	dtype    tensor.DType
	features []string
	outputs  []bundle.TensorSpec
	columns  []string
}

func newPredictPlan(man bundle.Manifest, rawMeta json.RawMessage) (*predictPlan, error) {
	if len(man.Inputs) != 1 {
		return nil, fmt.Errorf("the model takes %d input tensors; predict feeds CSV rows to models with one input of shape [-1, N] or [-1]", len(man.Inputs))
	}
	p := &predictPlan{input: man.Inputs[0], outputs: man.Outputs}
	in := p.input
	var err error
	if p.dtype, err = tensor.ParseDType(in.Datatype); err != nil {
		return nil, err
	}
	if p.dtype != tensor.FP32 && p.dtype != tensor.FP64 {
		return nil, fmt.Errorf("input %q is %s; predict feeds CSV numbers to FP32 or FP64 inputs only", in.Name, in.Datatype)
	}
	width := 1
	switch {
	case len(in.Shape) == 1 && in.Shape[0] == -1:
	case len(in.Shape) == 2 && in.Shape[0] == -1 && in.Shape[1] > 0:
		width = int(in.Shape[1])
	default:
		return nil, fmt.Errorf("input %q has shape %v; predict feeds one row per line to inputs of shape [-1, N] or [-1]", in.Name, in.Shape)
	}
	var md struct {
		Features []string `json:"features"`
		Columns  []string `json:"columns"`
	}
	_ = json.Unmarshal(rawMeta, &md) // hand-written modules may say less; names are optional
	p.features = md.Features
	if len(p.features) != width {
		p.features = make([]string, width)
		for i := range p.features {
			p.features[i] = "f" + strconv.Itoa(i)
		}
	}
	for _, o := range man.Outputs {
		switch {
		case len(o.Shape) == 1 && o.Shape[0] == -1:
			p.columns = append(p.columns, o.Name)
		case len(o.Shape) == 2 && o.Shape[0] == -1 && o.Shape[1] > 0:
			for i := 0; i < int(o.Shape[1]); i++ {
				p.columns = append(p.columns, fmt.Sprintf("%s[%d]", o.Name, i))
			}
		default:
			return nil, fmt.Errorf("output %q has shape %v; predict prints outputs of shape [-1] or [-1, K]", o.Name, o.Shape)
		}
	}
	if len(md.Columns) == len(p.columns) {
		p.columns = md.Columns
	}
	return p, nil
}

// run infers one batch and returns its output rows as CSV cells.
func (p *predictPlan) run(ctx context.Context, m *host.Model, rows [][]float32) ([][]string, error) {
	n := len(rows)
	shape := []int64{int64(n)}
	if len(p.input.Shape) == 2 {
		shape = append(shape, p.input.Shape[1])
	}
	flat := make([]float64, 0, n*len(p.features))
	for _, r := range rows {
		for _, v := range r {
			flat = append(flat, float64(v))
		}
	}
	in, err := tensor.FromFloat64(p.input.Name, p.dtype, shape, flat)
	if err != nil {
		return nil, err
	}
	outs, err := m.Infer(ctx, []tensor.Tensor{in})
	if err != nil {
		return nil, err
	}
	res := make([][]string, n)
	for _, spec := range p.outputs {
		var t *tensor.Tensor
		for i := range outs {
			if outs[i].Name == spec.Name {
				t = &outs[i]
			}
		}
		if t == nil {
			return nil, fmt.Errorf("the model returned no output %q", spec.Name)
		}
		vals, err := t.Float64s()
		if err != nil {
			return nil, err
		}
		if len(vals)%n != 0 {
			return nil, fmt.Errorf("output %q has %d values for %d rows", spec.Name, len(vals), n)
		}
		per := len(vals) / n
		bits := 64
		if t.DType == tensor.FP32 || t.DType == tensor.FP16 {
			bits = 32
		}
		for r := 0; r < n; r++ {
			for _, v := range vals[r*per : (r+1)*per] {
				res[r] = append(res[r], strconv.FormatFloat(v, 'g', -1, bits))
			}
		}
	}
	return res, nil
}

// buildFrom returns the value of --from in the arguments of `model build`,
// or "" when none is given.
func buildFrom(args []string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		for _, f := range []string{"-from", "--from"} {
			if a == f && i+1 < len(args) {
				return args[i+1]
			}
			if v, ok := strings.CutPrefix(a, f+"="); ok {
				return v
			}
		}
	}
	return ""
}
