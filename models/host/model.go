package host

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"

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
// concurrent use; Close or Drain ends it.
type Model struct {
	h        *Host
	manifest bundle.Manifest
	inputs   []tensor.Spec
	outputs  []tensor.Spec
	rt       wazero.Runtime
	compiled wazero.CompiledModule
	pages    uint32
	timeout  time.Duration
	log      *slog.Logger
	meta     json.RawMessage

	// slots holds one token per instance that may exist; idle holds the
	// instances not in use. A caller takes a token, then an idle instance
	// or makes a new one, and gives both back.
	slots chan struct{}

	mu      sync.Mutex
	idle    []*instance
	closed  bool
	pending int // discarded instances not yet replaced

	// inflight counts Infer calls between entry and return; Drain waits
	// for it to reach zero (drained is signalled when it does).
	inflight atomic.Int64
	draining atomic.Bool
	drained  chan struct{}

	stats counters
}

// counters are a model's Stats, updated without locks.
type counters struct {
	inferences, errors, badInputs, guestErrors, timeouts, traps atomic.Uint64
	instances, reinstantiations                                 atomic.Uint64
	peakMemory                                                  atomic.Uint64
	live                                                        atomic.Int64
}

// Stats are a model's counters since it was loaded. Golden tests run by
// Load are not counted, except in Instances.
type Stats struct {
	// Inferences is the number of Infer calls that returned.
	Inferences uint64 `json:"inferences"`
	// Errors is the number of those that failed, for any reason; the
	// fields below break some of them down.
	Errors uint64 `json:"errors"`
	// BadInputs: refused as ErrBadInput (the caller's fault).
	BadInputs uint64 `json:"badInputs"`
	// GuestErrors: the model reported an error (ErrGuest).
	GuestErrors uint64 `json:"guestErrors"`
	// Timeouts: stopped at the deadline (ErrTimeout).
	Timeouts uint64 `json:"timeouts"`
	// Traps: the module trapped, exited, panicked the Go runtime or ran
	// out of memory (ErrTrap).
	Traps uint64 `json:"traps"`
	// Instances is how many instances were made, the first one included.
	Instances uint64 `json:"instances"`
	// Reinstantiations is how many of those replaced an instance
	// discarded after a trap, a timeout or a protocol violation.
	Reinstantiations uint64 `json:"reinstantiations"`
	// LiveInstances is how many instances exist now, busy or idle.
	LiveInstances int `json:"liveInstances"`
	// InFlight is how many Infer calls are running or waiting for an
	// instance now.
	InFlight int `json:"inFlight"`
	// Busy is how many instances are serving a call now (at most the pool
	// size); InFlight - Busy calls are waiting for one.
	Busy int `json:"busy"`
	// PeakMemoryBytes is the largest linear memory any instance reached,
	// measured after each call; it never exceeds MemoryLimitBytes.
	PeakMemoryBytes uint64 `json:"peakMemoryBytes"`
	// MemoryLimitBytes is the cap on each instance's linear memory.
	MemoryLimitBytes uint64 `json:"memoryLimitBytes"`
}

// Load compiles the bundle's module (through the compilation cache), checks
// that it speaks a supported ABI and exports what the ABI requires, checks
// its metadata against the manifest, and runs the manifest's golden test
// vectors. The first failure refuses the bundle with an error wrapping
// ErrRefused (Check reports every problem instead). The bundle's signature
// is not checked here: that is the caller's job, with its trusted keys.
func (h *Host) Load(ctx context.Context, b *bundle.Bundle) (*Model, error) {
	if err := h.begin(); err != nil {
		return nil, err
	}
	defer h.busy.Done()
	m := h.newModel(ctx, b.Manifest)
	v := &verifier{m: m, b: b, failFast: true, report: &Report{}}
	if err := v.run(ctx); err != nil {
		m.discard(ctx)
		return nil, err
	}
	for _, f := range v.report.Findings {
		if f.Severity == Warn {
			m.log.Warn("model check: "+f.Message, "check", f.Check)
		}
	}
	if f := v.report.firstFailure(); f != nil {
		m.discard(ctx)
		return nil, fmt.Errorf("%w: %s %s: %s", ErrRefused, m.manifest.Name, m.manifest.Version, f.Message)
	}
	h.add(m)
	m.log.Info("model loaded", "digest", b.Digest, "memory_pages", m.pages, "timeout", m.timeout, "tests", len(m.manifest.Tests))
	return m, nil
}

// newModel prepares a Model for man: its limits, and a runtime of its own
// so that it gets its own memory cap (the compilation cache is shared, so
// a module still compiles once).
func (h *Host) newModel(ctx context.Context, man bundle.Manifest) *Model {
	pages := h.opts.MaxMemoryPages
	if p := man.Limits.MemoryPages; p > 0 && p < pages {
		pages = p
	}
	m := &Model{
		h:        h,
		manifest: man,
		inputs:   specs(man.Inputs),
		outputs:  specs(man.Outputs),
		pages:    pages,
		timeout:  man.Limits.Timeout(h.opts.DefaultTimeout),
		log:      h.log.With("model", man.Name, "version", man.Version),
		slots:    make(chan struct{}, h.opts.PoolSize),
		drained:  make(chan struct{}, 1),
	}
	m.rt = wazero.NewRuntimeWithConfig(ctx, h.runtimeConfig(pages))
	return m
}

// discard releases what a failed Load (or a Check) built.
func (m *Model) discard(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	m.mu.Lock()
	m.closed = true
	m.idle = nil
	m.mu.Unlock()
	_ = m.rt.Close(ctx)
	if m.compiled != nil {
		_ = m.compiled.Close(ctx)
	}
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

func tensorValue(v bundle.TensorValue) (tensor.Tensor, error) {
	d, err := tensor.ParseDType(v.Datatype)
	if err != nil {
		return tensor.Tensor{}, fmt.Errorf("tensor %q: %w", v.Name, err)
	}
	return tensor.FromFloat64(v.Name, d, v.Shape, v.Data)
}

// Manifest returns the bundle manifest the model was loaded from. Callers
// must not modify it.
func (m *Model) Manifest() *bundle.Manifest { return &m.manifest }

// Metadata returns the JSON the module's ef_metadata gave at load time.
func (m *Model) Metadata() json.RawMessage { return m.meta }

// Timeout is the deadline of one inference: the manifest's, or the host's
// default.
func (m *Model) Timeout() time.Duration { return m.timeout }

// Stats returns the model's counters.
func (m *Model) Stats() Stats {
	c := &m.stats
	return Stats{
		Inferences:       c.inferences.Load(),
		Errors:           c.errors.Load(),
		BadInputs:        c.badInputs.Load(),
		GuestErrors:      c.guestErrors.Load(),
		Timeouts:         c.timeouts.Load(),
		Traps:            c.traps.Load(),
		Instances:        c.instances.Load(),
		Reinstantiations: c.reinstantiations.Load(),
		LiveInstances:    int(c.live.Load()),
		InFlight:         int(m.inflight.Load()),
		Busy:             len(m.slots),
		PeakMemoryBytes:  c.peakMemory.Load(),
		MemoryLimitBytes: uint64(m.pages) * 65536,
	}
}

// Close stops the model: calls in flight fail with ErrClosed and its
// instances are released. Close is idempotent. To retire a model that may
// still be serving, use Drain.
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

// Drain closes the model once no Infer call is in flight, or when ctx
// ends (then the calls still running fail with ErrClosed). Calls that
// arrive while it waits are served. It is how the agent retires a model it
// has just swapped out: callers that picked up the old model just before
// the swap finish normally, and one that calls Infer after Drain closed it
// gets ErrClosed before any work is done, so it can retry on the model now
// active; every answer comes wholly from one version.
func (m *Model) Drain(ctx context.Context) error {
	m.draining.Store(true)
	for m.inflight.Load() > 0 {
		select {
		case <-m.drained:
		case <-ctx.Done():
			return errors.Join(m.Close(context.WithoutCancel(ctx)), ctx.Err())
		}
	}
	return m.Close(ctx)
}

// Warm makes instances until n (at most the pool size) are idle, so the
// first calls after an activation or a rollback do not pay for
// instantiation.
func (m *Model) Warm(ctx context.Context, n int) error {
	n = min(n, cap(m.slots))
	var made []*instance
	defer func() {
		for _, inst := range made {
			m.put(inst)
		}
	}()
	for {
		m.mu.Lock()
		enough := len(m.idle)+len(made) >= n
		m.mu.Unlock()
		if enough {
			return nil
		}
		select {
		case m.slots <- struct{}{}:
		default:
			return nil // every slot is busy: the pool is as warm as it gets
		}
		inst, err := m.newInstance(ctx)
		if err != nil {
			m.release()
			return fmt.Errorf("model %s %s: warm: %w", m.manifest.Name, m.manifest.Version, err)
		}
		made = append(made, inst)
	}
}

// ReleaseIdle closes idle instances beyond keep and returns how many it
// closed. A model kept loaded only for an instant rollback needs no
// instance: its compiled code stays, so it answers again after one
// instantiation (or a Warm), while its linear memories go back to the
// system.
func (m *Model) ReleaseIdle(ctx context.Context, keep int) int {
	keep = max(keep, 0)
	m.mu.Lock()
	var extra []*instance
	if len(m.idle) > keep {
		extra = append(extra, m.idle[keep:]...)
		// Clear the tail too: the array would keep the closed instances,
		// and their memories, reachable.
		clear(m.idle[keep:])
		m.idle = m.idle[:keep]
	}
	m.mu.Unlock()
	for _, inst := range extra {
		m.closeInstance(ctx, inst)
	}
	return len(extra)
}

// Infer runs the model on in and returns its outputs. The inputs must match
// the manifest's (by name, datatype and shape, -1 matching any size). Each
// call is bounded by the manifest's timeout (or the host default) and by
// ctx. Errors wrap ErrBadInput, ErrGuest, ErrTimeout, ErrTrap, ErrClosed or
// ctx's error.
//
// Infer neither modifies nor keeps in, so the agent may hand the same
// inputs to a shadow model concurrently.
func (m *Model) Infer(ctx context.Context, in []tensor.Tensor) ([]tensor.Tensor, error) {
	m.inflight.Add(1)
	out, err := m.infer(ctx, in, m.timeout)
	if m.inflight.Add(-1) == 0 && m.draining.Load() {
		select {
		case m.drained <- struct{}{}:
		default:
		}
	}
	m.count(err)
	return out, err
}

func (m *Model) count(err error) {
	c := &m.stats
	c.inferences.Add(1)
	if err == nil {
		return
	}
	c.errors.Add(1)
	switch {
	case errors.Is(err, ErrBadInput):
		c.badInputs.Add(1)
	case errors.Is(err, ErrTimeout):
		c.timeouts.Add(1)
	case errors.Is(err, ErrTrap):
		c.traps.Add(1)
	case errors.Is(err, ErrGuest):
		c.guestErrors.Add(1)
	}
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
	m.notePeak(inst)
	if inst.broken {
		m.mu.Lock()
		m.pending++
		m.mu.Unlock()
		m.closeInstance(ctx, inst)
		m.release()
		m.log.Warn("model instance discarded; the next call makes a new one", "err", err, "trace", inst.trace)
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

// notePeak raises the memory high-water mark to inst's memory size.
func (m *Model) notePeak(inst *instance) {
	size := inst.memoryBytes()
	for {
		old := m.stats.peakMemory.Load()
		if size <= old || m.stats.peakMemory.CompareAndSwap(old, size) {
			return
		}
	}
}

func (m *Model) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// get takes a slot and returns an idle instance, or a new one.
func (m *Model) get(ctx context.Context) (*instance, error) {
	select {
	case m.slots <- struct{}{}: // the common case, without a select on ctx
	default:
		select {
		case m.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("model %s: waiting for a free instance: %w", m.manifest.Name, ctx.Err())
		}
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		m.release()
		return nil, fmt.Errorf("%w: %s", ErrClosed, m.manifest.Name)
	}
	if n := len(m.idle); n > 0 {
		inst := m.idle[n-1]
		m.idle[n-1] = nil
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
		m.closeInstance(context.Background(), inst)
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
	m.stats.instances.Add(1)
	m.stats.live.Add(1)
	m.mu.Lock()
	if m.pending > 0 {
		m.pending--
		m.stats.reinstantiations.Add(1)
	}
	m.mu.Unlock()
	m.log.Debug("model instance started", "took", time.Since(start))
	return newInstance(mod), nil
}

func (m *Model) closeInstance(ctx context.Context, inst *instance) {
	inst.close(ctx)
	m.stats.live.Add(-1)
}
