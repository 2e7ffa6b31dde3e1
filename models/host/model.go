package host

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// wasiModule is the only module a guest may import from.
const wasiModule = "wasi_snapshot_preview1"

// export is one function the ABI requires, with its signature.
type export struct {
	name    string
	params  int // all i32
	results int // all i32
}

var requiredExports = []export{
	{"ef_abi_version", 0, 1},
	{"ef_alloc", 1, 1},
	{"ef_infer", 4, 1},
	{"ef_last_error", 2, 1},
	{"ef_metadata", 2, 1},
}

// DefaultTolerance is the absolute tolerance of a golden test vector that
// sets none.
const DefaultTolerance = 1e-5

// Model is a loaded bundle ready to serve inferences. Infer is safe for
// concurrent use; Close ends it.
type Model struct {
	h        *Host
	manifest bundle.Manifest
	inputs   []tensor.Spec
	outputs  []tensor.Spec
	rt       wazero.Runtime
	compiled wazero.CompiledModule
	timeout  time.Duration
	log      *slog.Logger
	meta     json.RawMessage

	// slots holds one token per instance that may exist; idle holds the
	// instances not in use. A caller takes a token, then an idle instance
	// or makes a new one, and gives both back.
	slots chan struct{}

	mu     sync.Mutex
	idle   []*instance
	closed bool
}

// Load compiles the bundle's module (through the compilation cache), checks
// that it speaks a supported ABI and exports what the ABI requires, checks
// its metadata against the manifest, and runs the manifest's golden test
// vectors. Any failure refuses the bundle with an error wrapping
// ErrRefused. The bundle's signature is not checked here: that is the
// caller's job, with its trusted keys.
func (h *Host) Load(ctx context.Context, b *bundle.Bundle) (*Model, error) {
	if err := h.begin(); err != nil {
		return nil, err
	}
	defer h.busy.Done()
	man := b.Manifest
	log := h.log.With("model", man.Name, "version", man.Version)
	if man.ABI < 0 || !abiSupported(uint32(man.ABI)) {
		return nil, fmt.Errorf("%w: %s %s: manifest asks for model ABI v%d; this host speaks %s; rebuild the model for a supported ABI or update the host",
			ErrRefused, man.Name, man.Version, man.ABI, abiList())
	}
	m := &Model{
		h:        h,
		manifest: man,
		inputs:   specs(man.Inputs),
		outputs:  specs(man.Outputs),
		timeout:  man.Limits.Timeout(h.opts.DefaultTimeout),
		log:      log,
		slots:    make(chan struct{}, h.opts.PoolSize),
	}
	for _, s := range append(append([]tensor.Spec{}, m.inputs...), m.outputs...) {
		if err := s.Validate(); err != nil {
			return nil, fmt.Errorf("%w: %s %s: manifest: %w", ErrRefused, man.Name, man.Version, err)
		}
	}
	pages := h.opts.MaxMemoryPages
	if p := man.Limits.MemoryPages; p > 0 && p < pages {
		pages = p
	} else if p > pages {
		log.Warn("manifest asks for more memory than the host allows; capped", "asked_pages", p, "cap_pages", pages)
	}
	// One runtime per model, so each gets its own memory cap; the
	// compilation cache is shared, so a module compiles once.
	m.rt = wazero.NewRuntimeWithConfig(ctx, h.runtimeConfig(pages))
	if err := m.load(ctx, b); err != nil {
		m.discard(ctx)
		return nil, err
	}
	h.add(m)
	log.Info("model loaded", "digest", b.Digest, "memory_pages", pages, "timeout", m.timeout, "tests", len(man.Tests))
	return m, nil
}

// discard releases what a failed Load built.
func (m *Model) discard(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	_ = m.rt.Close(ctx)
	if m.compiled != nil {
		_ = m.compiled.Close(ctx)
	}
}

func (m *Model) refuse(format string, args ...any) error {
	return fmt.Errorf("%w: %s %s: %s", ErrRefused, m.manifest.Name, m.manifest.Version, fmt.Sprintf(format, args...))
}

func (m *Model) load(ctx context.Context, b *bundle.Bundle) error {
	if _, err := wasi_snapshot_preview1.Instantiate(ctx, m.rt); err != nil {
		return fmt.Errorf("host: instantiate wasi: %w", err)
	}
	start := time.Now()
	compiled, err := m.rt.CompileModule(ctx, b.Module)
	if err != nil {
		return m.refuse("module does not compile: %v", err)
	}
	m.compiled = compiled
	m.log.Debug("module compiled", "took", time.Since(start), "bytes", len(b.Module))

	exports := compiled.ExportedFunctions()
	if err := checkSignature(exports, requiredExports[0]); err != nil {
		return m.refuse("%v; is this an Edgefleet model (see models/ABI.md)?", err)
	}
	if _, ok := exports["_start"]; ok {
		if _, ok := exports["_initialize"]; !ok {
			return m.refuse("module is a WASI command (exports _start, not _initialize); build it as a reactor, e.g. go build -buildmode=c-shared")
		}
	}
	for _, f := range compiled.ImportedFunctions() {
		mod, name, _ := f.Import()
		if mod != wasiModule {
			return m.refuse("module imports %s.%s; models may import only from %s", mod, name, wasiModule)
		}
	}
	if len(compiled.ImportedMemories()) > 0 {
		return m.refuse("module imports its memory; it must define and export its own as \"memory\"")
	}

	// The first instance takes a pool slot like any other and goes back to
	// the pool, so the golden tests and the first real call reuse it.
	m.slots <- struct{}{}
	inst, err := m.newInstance(ctx)
	if err != nil {
		m.release()
		return m.refuse("%v", err)
	}
	healthy := false
	defer func() {
		if !healthy {
			inst.close(ctx)
			m.release()
		}
	}()
	actx, cancel := context.WithTimeout(ctx, instantiateTimeout)
	res, err := inst.call(actx, inst.abiVersion)
	cancel()
	if err != nil {
		return m.refuse("ef_abi_version: %v", err)
	}
	if v := uint32(res); !abiSupported(v) {
		return m.refuse("module speaks model ABI v%d; this host speaks %s; rebuild the model with a matching SDK or update the host", v, abiList())
	} else if int(v) != m.manifest.ABI {
		return m.refuse("module speaks model ABI v%d but the manifest says v%d; rebuild the bundle", v, m.manifest.ABI)
	}
	for _, e := range requiredExports[1:] {
		if err := checkSignature(exports, e); err != nil {
			return m.refuse("%v (models/ABI.md)", err)
		}
	}
	if _, ok := compiled.ExportedMemories()["memory"]; !ok {
		return m.refuse("module does not export its memory as \"memory\" (models/ABI.md)")
	}
	meta, err := inst.metadata(ctx)
	if err != nil {
		return m.refuse("ef_metadata: %v", err)
	}
	if err := m.checkMetadata(meta); err != nil {
		return err
	}
	m.meta = meta
	healthy = true
	m.put(inst)
	for i, tv := range m.manifest.Tests {
		if err := m.runTest(ctx, tv); err != nil {
			return m.refuse("golden test %d of %d failed: %v; the module does not reproduce the manifest's test vectors", i+1, len(m.manifest.Tests), err)
		}
	}
	return nil
}

func checkSignature(exports map[string]api.FunctionDefinition, e export) error {
	f, ok := exports[e.name]
	if !ok {
		return fmt.Errorf("module does not export %s", e.name)
	}
	ok = len(f.ParamTypes()) == e.params && len(f.ResultTypes()) == e.results
	for _, t := range append(f.ParamTypes(), f.ResultTypes()...) {
		ok = ok && t == api.ValueTypeI32
	}
	if !ok {
		return fmt.Errorf("export %s has signature %v -> %v, want %d i32 parameters -> %d i32 result", e.name,
			typeNames(f.ParamTypes()), typeNames(f.ResultTypes()), e.params, e.results)
	}
	return nil
}

func typeNames(ts []api.ValueType) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = api.ValueTypeName(t)
	}
	return out
}

func abiList() string {
	s := make([]string, len(SupportedABIs))
	for i, v := range SupportedABIs {
		s[i] = fmt.Sprintf("v%d", v)
	}
	return "model ABI " + strings.Join(s, ", ")
}

func specs(ts []bundle.TensorSpec) []tensor.Spec {
	out := make([]tensor.Spec, len(ts))
	for i, t := range ts {
		out[i] = tensor.Spec{Name: t.Name, Datatype: t.Datatype, Shape: t.Shape}
	}
	return out
}

// checkMetadata compares what the module says it is with the manifest: a
// bundle whose module is another model, or another version, is a packaging
// mistake that must not reach a device.
func (m *Model) checkMetadata(raw []byte) error {
	var md struct {
		Name    string        `json:"name"`
		Version string        `json:"version"`
		Inputs  []tensor.Spec `json:"inputs"`
		Outputs []tensor.Spec `json:"outputs"`
	}
	if err := json.Unmarshal(raw, &md); err != nil {
		return m.refuse("ef_metadata returned invalid JSON: %v", err)
	}
	if md.Name != m.manifest.Name || md.Version != m.manifest.Version {
		return m.refuse("module says it is %s %s; rebuild the bundle from the right module", md.Name, md.Version)
	}
	if md.Inputs != nil && !sameSpecs(md.Inputs, m.inputs) {
		return m.refuse("module inputs %v differ from the manifest's %v", md.Inputs, m.inputs)
	}
	if md.Outputs != nil && !sameSpecs(md.Outputs, m.outputs) {
		return m.refuse("module outputs %v differ from the manifest's %v", md.Outputs, m.outputs)
	}
	return nil
}

func sameSpecs(a, b []tensor.Spec) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Name != b[i].Name || a[i].Datatype != b[i].Datatype || len(a[i].Shape) != len(b[i].Shape) {
			return false
		}
		for j := range a[i].Shape {
			if a[i].Shape[j] != b[i].Shape[j] {
				return false
			}
		}
	}
	return true
}

// runTest runs one golden vector and compares every expected output.
func (m *Model) runTest(ctx context.Context, tv bundle.TestVector) error {
	in := make([]tensor.Tensor, len(tv.Inputs))
	for i, v := range tv.Inputs {
		t, err := tensorValue(v)
		if err != nil {
			return err
		}
		in[i] = t
	}
	// Golden tests check answers, not speed: a device busy installing an
	// update must not refuse a good model over a slow first call. The
	// bound still stops a model that never answers.
	out, err := m.infer(ctx, in, min(10*m.timeout, instantiateTimeout))
	if err != nil {
		return err
	}
	tol := tv.Tolerance
	if tol <= 0 {
		tol = DefaultTolerance
	}
	for _, want := range tv.Outputs {
		var got *tensor.Tensor
		for i := range out {
			if out[i].Name == want.Name {
				got = &out[i]
			}
		}
		if got == nil {
			return fmt.Errorf("output %q missing", want.Name)
		}
		if got.DType.String() != want.Datatype || !(tensor.Spec{Shape: want.Shape}).ShapeMatches(got.Shape) {
			return fmt.Errorf("output %q is %s%v, want %s%v", want.Name, got.DType, got.Shape, want.Datatype, want.Shape)
		}
		vals, err := got.Float64s()
		if err != nil {
			return err
		}
		if len(vals) != len(want.Data) {
			return fmt.Errorf("output %q has %d elements, want %d", want.Name, len(vals), len(want.Data))
		}
		for i, w := range want.Data {
			if d := math.Abs(vals[i] - w); !(d <= tol) {
				return fmt.Errorf("output %q element %d is %v, want %v (tolerance %g)", want.Name, i, vals[i], w, tol)
			}
		}
	}
	return nil
}

func tensorValue(v bundle.TensorValue) (tensor.Tensor, error) {
	d, err := tensor.ParseDType(v.Datatype)
	if err != nil {
		return tensor.Tensor{}, fmt.Errorf("test input %q: %w", v.Name, err)
	}
	return tensor.FromFloat64(v.Name, d, v.Shape, v.Data)
}

// Manifest returns the bundle manifest the model was loaded from. Callers
// must not modify it.
func (m *Model) Manifest() *bundle.Manifest { return &m.manifest }

// Metadata returns the JSON the module's ef_metadata gave at load time.
func (m *Model) Metadata() json.RawMessage { return m.meta }

// Close stops the model: calls in flight fail with ErrClosed and its
// instances are released. Close is idempotent.
func (m *Model) Close(ctx context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.idle = nil
	m.mu.Unlock()
	m.h.remove(m)
	// The compilation cache is shared and outlives the runtime; closing
	// the compiled module drops this model's reference to the machine
	// code, so reloading models for months does not grow memory.
	return errors.Join(m.rt.Close(ctx), m.compiled.Close(ctx))
}

// Infer runs the model on in and returns its outputs. The inputs must match
// the manifest's (by name, datatype and shape, -1 matching any size). Each
// call is bounded by the manifest's timeout (or the host default) and by
// ctx. Errors wrap ErrBadInput, ErrGuest, ErrTimeout, ErrTrap, ErrClosed or
// ctx's error.
func (m *Model) Infer(ctx context.Context, in []tensor.Tensor) ([]tensor.Tensor, error) {
	return m.infer(ctx, in, m.timeout)
}

func (m *Model) infer(ctx context.Context, in []tensor.Tensor, timeout time.Duration) ([]tensor.Tensor, error) {
	if err := tensor.CheckAll(m.inputs, in, "input"); err != nil {
		return nil, fmt.Errorf("%w: model %s: %w", ErrBadInput, m.manifest.Name, err)
	}
	inst, err := m.get(ctx)
	if err != nil {
		return nil, err
	}
	out, err := inst.infer(ctx, in, timeout)
	if inst.broken {
		inst.close(ctx)
		m.release()
		m.log.Warn("model instance discarded", "err", err, "trace", inst.trace)
	} else {
		m.put(inst)
	}
	if err != nil {
		if m.isClosed() {
			return nil, fmt.Errorf("%w: %s: %w", ErrClosed, m.manifest.Name, err)
		}
		return nil, fmt.Errorf("model %s %s: %w", m.manifest.Name, m.manifest.Version, err)
	}
	if err := tensor.CheckAll(m.outputs, out, "output"); err != nil {
		return nil, fmt.Errorf("%w: model %s %s: outputs do not match the manifest: %w", ErrGuest, m.manifest.Name, m.manifest.Version, err)
	}
	return out, nil
}

func (m *Model) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// get takes a slot and returns an idle instance, or a new one.
func (m *Model) get(ctx context.Context) (*instance, error) {
	select {
	case m.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("model %s: waiting for a free instance: %w", m.manifest.Name, ctx.Err())
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		m.release()
		return nil, fmt.Errorf("%w: %s", ErrClosed, m.manifest.Name)
	}
	if n := len(m.idle); n > 0 {
		inst := m.idle[n-1]
		m.idle = m.idle[:n-1]
		m.mu.Unlock()
		return inst, nil
	}
	m.mu.Unlock()
	inst, err := m.newInstance(ctx)
	if err != nil {
		m.release()
		if m.isClosed() {
			return nil, fmt.Errorf("%w: %s", ErrClosed, m.manifest.Name)
		}
		return nil, fmt.Errorf("%w: model %s: new instance: %w", ErrTrap, m.manifest.Name, err)
	}
	return inst, nil
}

// put returns a healthy instance to the idle list and frees its slot.
func (m *Model) put(inst *instance) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		inst.close(context.Background())
	} else {
		m.idle = append(m.idle, inst)
		m.mu.Unlock()
	}
	m.release()
}

func (m *Model) release() {
	select {
	case <-m.slots:
	default:
	}
}

// newInstance instantiates the module with no capabilities beyond clocks,
// random and logged stdio, and runs its _initialize.
func (m *Model) newInstance(ctx context.Context) (*instance, error) {
	ictx, cancel := context.WithTimeout(ctx, instantiateTimeout)
	defer cancel()
	cfg := wazero.NewModuleConfig().
		WithName("").
		WithStartFunctions("_initialize").
		WithSysWalltime().
		WithSysNanotime().
		WithSysNanosleep().
		WithRandSource(rand.Reader).
		WithStdout(newLogWriter(m.log, slog.LevelDebug, "stdout")).
		WithStderr(newLogWriter(m.log, slog.LevelWarn, "stderr"))
	start := time.Now()
	mod, err := m.rt.InstantiateModule(ictx, m.compiled, cfg)
	if err != nil {
		return nil, fmt.Errorf("instantiate: %w", err)
	}
	m.log.Debug("model instance started", "took", time.Since(start))
	return newInstance(mod), nil
}
