package host

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"time"

	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// Severity grades a Finding.
type Severity int

const (
	// Pass: the check passed.
	Pass Severity = iota
	// Warn: the bundle loads, but something is likely a mistake.
	Warn
	// Fail: Load refuses the bundle.
	Fail
)

func (s Severity) String() string {
	switch s {
	case Pass:
		return "ok"
	case Warn:
		return "warn"
	case Fail:
		return "FAIL"
	}
	return fmt.Sprintf("severity(%d)", int(s))
}

// MarshalText writes the severity as in String.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (s *Severity) UnmarshalText(b []byte) error {
	for _, c := range []Severity{Pass, Warn, Fail} {
		if string(b) == c.String() {
			*s = c
			return nil
		}
	}
	return fmt.Errorf("severity %q: want ok, warn or FAIL", b)
}

// Finding is the outcome of one check of a bundle.
type Finding struct {
	// Check names what was checked: bundle, manifest, limits, tests,
	// module, imports, exports, instance, abi, metadata, golden N/M.
	Check    string   `json:"check"`
	Severity Severity `json:"severity"`
	// Message says what was found and, for a problem, what to do.
	Message string `json:"message"`
}

// Report is what Check found in a bundle: every problem, not just the
// first, plus the checks that passed.
type Report struct {
	Name     string    `json:"name"`
	Version  string    `json:"version"`
	ABI      int       `json:"abi"`
	Digest   string    `json:"digest,omitempty"`
	Findings []Finding `json:"findings"`
}

// OK reports whether no check failed (warnings allowed): Load accepts the
// bundle.
func (r *Report) OK() bool { return r.firstFailure() == nil }

// Problems returns the failed checks and the warnings, in check order.
func (r *Report) Problems() []Finding {
	var out []Finding
	for _, f := range r.Findings {
		if f.Severity != Pass {
			out = append(out, f)
		}
	}
	return out
}

// Count returns how many findings have severity s.
func (r *Report) Count(s Severity) int {
	n := 0
	for _, f := range r.Findings {
		if f.Severity == s {
			n++
		}
	}
	return n
}

// Err is nil when the report is OK, else an error wrapping ErrRefused that
// lists every failure.
func (r *Report) Err() error {
	var msgs []string
	for _, f := range r.Findings {
		if f.Severity == Fail {
			msgs = append(msgs, f.Check+": "+f.Message)
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s %s: %d problems:\n  %s", ErrRefused, r.Name, r.Version, len(msgs), joinLines(msgs))
}

func joinLines(s []string) string {
	var b bytes.Buffer
	for i, l := range s {
		if i > 0 {
			b.WriteString("\n  ")
		}
		b.WriteString(l)
	}
	return b.String()
}

func (r *Report) firstFailure() *Finding {
	for i := range r.Findings {
		if r.Findings[i].Severity == Fail {
			return &r.Findings[i]
		}
	}
	return nil
}

// Check validates b against Model ABI v1 the way Load does (manifest and
// limits, module, imports and exports, ABI version, metadata against the
// manifest, every golden test vector within its tolerance) but reports
// every problem it finds instead of stopping at the first. The model is
// not kept. The error is only for the host itself failing (closed, or
// unable to set up a runtime); problems of the bundle are in the Report.
func (h *Host) Check(ctx context.Context, b *bundle.Bundle) (*Report, error) {
	if err := h.begin(); err != nil {
		return nil, err
	}
	defer h.busy.Done()
	r := &Report{Name: b.Manifest.Name, Version: b.Manifest.Version, ABI: b.Manifest.ABI, Digest: b.Digest}
	m := h.newModel(ctx, b.Manifest)
	defer m.discard(ctx)
	v := &verifier{m: m, b: b, report: r}
	if err := v.run(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// CheckFile is Check for the bytes of a bundle file, as `fleet model
// check` reads it. A file that bundle.Decode refuses is still read as far
// as it can be (the manifest and the module), so that its other problems
// are reported too.
func (h *Host) CheckFile(ctx context.Context, data []byte) (*Report, error) {
	b, err := bundle.Decode(data)
	if err == nil {
		return h.Check(ctx, b)
	}
	decodeErr := Finding{Check: "bundle", Severity: Fail, Message: err.Error()}
	lb, lerr := readLenient(data)
	if lerr != nil {
		return &Report{Findings: []Finding{decodeErr, {Check: "bundle", Severity: Fail, Message: lerr.Error()}}}, nil
	}
	r, cerr := h.Check(ctx, lb)
	if cerr != nil {
		return nil, cerr
	}
	r.Findings = append([]Finding{decodeErr}, r.Findings...)
	return r, nil
}

// readLenient extracts the manifest and the module of a bundle file that
// bundle.Decode refused, ignoring what it can (member order, a module that
// does not match its pin, unknown manifest fields) and keeping the same
// size caps.
func readLenient(data []byte) (*bundle.Bundle, error) {
	if len(data) > bundle.MaxBundleSize {
		return nil, fmt.Errorf("%d bytes, over the %d byte limit of a bundle; nothing more can be checked", len(data), bundle.MaxBundleSize)
	}
	b := &bundle.Bundle{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("not a tar archive (%v); nothing more can be checked", err)
		}
		var dst *[]byte
		var limit int64
		switch h.Name {
		case bundle.ManifestName:
			dst, limit = &b.ManifestJSON, bundle.MaxManifestSize
		case bundle.ModuleName:
			dst, limit = &b.Module, bundle.MaxBundleSize
		default:
			continue
		}
		if h.Typeflag != tar.TypeReg || h.Size > limit {
			continue
		}
		if *dst, err = io.ReadAll(io.LimitReader(tr, limit)); err != nil {
			return nil, fmt.Errorf("member %s: %v; nothing more can be checked", h.Name, err)
		}
	}
	if b.ManifestJSON == nil || b.Module == nil {
		return nil, fmt.Errorf("the archive lacks a readable %s or %s; nothing more can be checked", bundle.ManifestName, bundle.ModuleName)
	}
	if err := json.Unmarshal(b.ManifestJSON, &b.Manifest); err != nil {
		return nil, fmt.Errorf("%s is not a manifest (%v); nothing more can be checked", bundle.ManifestName, err)
	}
	sum := sha256.Sum256(data)
	b.Digest = hex.EncodeToString(sum[:])
	return b, nil
}

// verifier runs the checks of a bundle in order, recording findings. In
// fail-fast mode (Load) it stops at the first failure; otherwise (Check)
// it goes on with every check whose prerequisites passed.
type verifier struct {
	m        *Model
	b        *bundle.Bundle
	failFast bool
	report   *Report

	tests []goldenCase
	inst  *instance
	// what the module lacks, so later checks that need it are skipped
	noVersion, noInstance, noCalls, noMetadata bool
}

// goldenCase is a manifest test vector converted to tensors; in is nil if
// the vector is malformed (already reported).
type goldenCase struct {
	in []tensor.Tensor
	tv bundle.TestVector
}

func (v *verifier) add(check string, s Severity, format string, args ...any) {
	v.report.Findings = append(v.report.Findings, Finding{Check: check, Severity: s, Message: fmt.Sprintf(format, args...)})
}

// halted reports whether a fail-fast run must stop.
func (v *verifier) halted() bool { return v.failFast && v.report.firstFailure() != nil }

// run checks everything. Its error is the host's, not the bundle's.
func (v *verifier) run(ctx context.Context) error {
	v.checkManifest()
	if v.halted() {
		return nil
	}
	start := time.Now()
	compiled, err := v.m.rt.CompileModule(ctx, v.b.Module)
	if err != nil {
		v.add("module", Fail, "module does not compile: %v", err)
		return nil
	}
	v.m.compiled = compiled
	// WASI only for modules that import it: instantiating it costs a
	// fifth of a small compiled model's activation.
	if len(compiled.ImportedFunctions()) > 0 {
		if _, err := wasi_snapshot_preview1.Instantiate(ctx, v.m.rt); err != nil {
			return fmt.Errorf("host: instantiate wasi: %w", err)
		}
	}
	v.add("module", Pass, "module compiles (%d bytes, %v)", len(v.b.Module), time.Since(start).Round(time.Millisecond))
	v.checkStatic()
	if v.halted() {
		return nil
	}
	v.checkInstance(ctx)
	if v.halted() {
		return nil
	}
	v.checkExports()
	if v.halted() {
		return nil
	}
	v.checkMetadata(ctx)
	if v.halted() {
		return nil
	}
	v.runGolden(ctx)
	return nil
}

// checkManifest checks the manifest on its own: ABI, tensors, limits and
// the shape of the golden vectors.
func (v *verifier) checkManifest() {
	man := &v.m.manifest
	if man.ABI < 0 || !abiSupported(uint32(man.ABI)) {
		v.add("manifest", Fail, "manifest asks for model ABI v%d; this host speaks %s; rebuild the model for a supported ABI or update the host", man.ABI, abiList())
		if v.failFast {
			return
		}
	}
	specsOK := true
	for _, s := range append(append([]tensor.Spec{}, v.m.inputs...), v.m.outputs...) {
		if err := s.Validate(); err != nil {
			v.add("manifest", Fail, "manifest: %v", err)
			specsOK = false
		}
	}
	if len(v.m.inputs) == 0 || len(v.m.outputs) == 0 {
		v.add("manifest", Fail, "manifest must declare at least one input and one output tensor")
		specsOK = false
	}
	if specsOK && abiSupported(uint32(max(man.ABI, 0))) {
		v.add("manifest", Pass, "manifest: ABI v%d, %d inputs, %d outputs", man.ABI, len(v.m.inputs), len(v.m.outputs))
	}
	v.checkLimits()
	v.checkTests(specsOK)
}

const (
	maxWasmPages = 65536
	// longTimeout is a deadline past which a stuck model holds an
	// instance (and a CPU) long enough to matter on a device.
	longTimeout = time.Minute
)

func (v *verifier) checkLimits() {
	l := v.m.manifest.Limits
	hostCap := v.m.h.opts.MaxMemoryPages
	ok := true
	switch {
	case l.MemoryPages > maxWasmPages:
		v.add("limits", Fail, "limits.memoryPages %d is over the WebAssembly maximum of %d pages (4 GiB); set what the model needs", l.MemoryPages, maxWasmPages)
		ok = false
	case l.MemoryPages > hostCap:
		v.add("limits", Warn, "limits.memoryPages %d is over this host's cap of %d pages; the model runs with %d pages (%d MiB)", l.MemoryPages, hostCap, hostCap, hostCap/16)
		ok = false
	case l.MemoryPages == 0:
		v.add("limits", Warn, "limits.memoryPages is not set; the model gets the host's cap of %d pages (%d MiB), likely far more than it needs: set a limit so a leak is stopped early", hostCap, hostCap/16)
		ok = false
	}
	switch {
	case l.TimeoutMillis < 0:
		v.add("limits", Fail, "limits.timeoutMillis %d is negative; set a positive deadline in milliseconds, or 0 for the host default (%v)", l.TimeoutMillis, v.m.h.opts.DefaultTimeout)
		ok = false
	case time.Duration(l.TimeoutMillis)*time.Millisecond > longTimeout:
		v.add("limits", Warn, "limits.timeoutMillis %d lets a stuck call hold an instance for over %v; set a deadline close to the model's real latency", l.TimeoutMillis, longTimeout)
		ok = false
	}
	if ok {
		v.add("limits", Pass, "limits: %d pages (%d MiB) of memory, %v per inference", v.m.pages, v.m.pages/16, v.m.timeout)
	}
}

// checkTests converts the golden vectors and checks them against the
// manifest's tensors, so a typo in a test is reported as such rather than
// as a model failing it.
func (v *verifier) checkTests(specsOK bool) {
	tests := v.m.manifest.Tests
	if len(tests) == 0 {
		v.add("tests", Warn, "the manifest has no golden test vectors, so a device cannot check the module before activating it; add some (inputs and expected outputs) to tests")
		return
	}
	v.tests = make([]goldenCase, len(tests))
	bad := 0
	for k, tv := range tests {
		v.tests[k].tv = tv
		label := fmt.Sprintf("golden %d/%d", k+1, len(tests))
		problems := testProblems(tv, v.m.inputs, v.m.outputs, specsOK)
		var in []tensor.Tensor
		for _, val := range tv.Inputs {
			t, err := tensorValue(val)
			if err != nil {
				problems = append(problems, "input "+err.Error())
				continue
			}
			in = append(in, t)
		}
		if len(problems) == 0 && specsOK {
			if err := tensor.CheckAll(v.m.inputs, in, "input"); err != nil {
				problems = append(problems, err.Error())
			}
		}
		for _, p := range problems {
			v.add(label, Fail, "test vector %d of %d is malformed: %s; fix the manifest's tests", k+1, len(tests), p)
		}
		if len(problems) > 0 {
			bad++
			continue
		}
		v.tests[k].in = in
	}
	if bad == 0 {
		v.add("tests", Pass, "%d golden test vectors well formed", len(tests))
	}
}

// testProblems lists what is wrong with a test vector's expected outputs
// and tolerance.
func testProblems(tv bundle.TestVector, inputs, outputs []tensor.Spec, specsOK bool) []string {
	var out []string
	if tv.Tolerance < 0 || math.IsNaN(tv.Tolerance) || math.IsInf(tv.Tolerance, 0) {
		out = append(out, fmt.Sprintf("tolerance %v must be a finite number >= 0", tv.Tolerance))
	}
	if len(tv.Outputs) == 0 {
		out = append(out, "it expects no outputs, so it checks nothing")
	}
	for _, want := range tv.Outputs {
		var spec *tensor.Spec
		for i := range outputs {
			if outputs[i].Name == want.Name {
				spec = &outputs[i]
			}
		}
		if spec == nil {
			out = append(out, fmt.Sprintf("expected output %q is not a declared output", want.Name))
			continue
		}
		if specsOK && (want.Datatype != spec.Datatype || !spec.ShapeMatches(want.Shape)) {
			out = append(out, fmt.Sprintf("expected output %q is %s%v, but the manifest declares %s%v", want.Name, want.Datatype, want.Shape, spec.Datatype, spec.Shape))
			continue
		}
		if n, err := tensor.NumElements(want.Shape); err != nil || n != int64(len(want.Data)) {
			out = append(out, fmt.Sprintf("expected output %q has %d values for shape %v", want.Name, len(want.Data), want.Shape))
		}
	}
	return out
}

// checkStatic checks what the compiled module declares, before running
// any of it.
func (v *verifier) checkStatic() {
	compiled := v.m.compiled
	exports := compiled.ExportedFunctions()
	if err := checkSignature(exports, requiredExports[0]); err != nil {
		v.add("exports", Fail, "%v; is this an Edgefleet model (see models/ABI.md)?", err)
		v.noVersion = true
		if v.failFast {
			return
		}
	}
	if _, ok := exports["_start"]; ok {
		if _, ok := exports["_initialize"]; !ok {
			v.add("exports", Fail, "module is a WASI command (exports _start, not _initialize); build it as a reactor, e.g. go build -buildmode=c-shared")
			v.noInstance = true
			if v.failFast {
				return
			}
		}
	}
	importsOK := true
	for _, f := range compiled.ImportedFunctions() {
		mod, name, _ := f.Import()
		if mod != wasiModule {
			v.add("imports", Fail, "module imports %s.%s; models may import only from %s", mod, name, wasiModule)
			v.noInstance, importsOK = true, false
			if v.failFast {
				return
			}
		}
	}
	if len(compiled.ImportedMemories()) > 0 {
		v.add("imports", Fail, "module imports its memory; it must define and export its own as \"memory\"")
		v.noInstance, importsOK = true, false
		if v.failFast {
			return
		}
	}
	if n := len(compiled.ImportedFunctions()); importsOK && n == 0 {
		v.add("imports", Pass, "imports: none")
	} else if importsOK {
		v.add("imports", Pass, "imports: %d functions, all from %s", n, wasiModule)
	}
	if mem, ok := compiled.ExportedMemories()["memory"]; ok && mem.Min() > v.m.pages {
		v.add("limits", Fail, "the module's memory starts at %d pages, over its limit of %d pages; raise limits.memoryPages (and the host cap) or make the module start smaller", mem.Min(), v.m.pages)
		v.noInstance = true
	}
}

// checkInstance makes the first instance and asks its ABI version.
func (v *verifier) checkInstance(ctx context.Context) {
	if v.noInstance {
		v.add("instance", Fail, "not instantiated: fix the problems above first")
		v.noCalls = true
		return
	}
	// The first instance takes a pool slot like any other and goes back
	// to the pool, so the golden tests and the first real call reuse it.
	v.m.slots <- struct{}{}
	inst, err := v.m.newInstance(ctx)
	if err != nil {
		v.m.release()
		v.add("instance", Fail, "%v", err)
		v.noCalls = true
		return
	}
	v.inst = inst
	if v.noVersion {
		return
	}
	res, err := inst.call(ctx, time.Now().Add(instantiateTimeout), inst.abiVersion)
	switch {
	case err != nil:
		v.add("abi", Fail, "ef_abi_version: %v", err)
	case !abiSupported(uint32(res)):
		v.add("abi", Fail, "module speaks model ABI v%d; this host speaks %s; rebuild the model with a matching SDK or update the host", uint32(res), abiList())
	case int(res) != v.m.manifest.ABI:
		v.add("abi", Fail, "module speaks model ABI v%d but the manifest says v%d; rebuild the bundle", res, v.m.manifest.ABI)
	default:
		v.add("abi", Pass, "module speaks model ABI v%d", res)
	}
}

// checkExports checks the exports beyond ef_abi_version (after the version
// call, so that a module of another ABI is told so rather than that it
// lacks some export).
func (v *verifier) checkExports() {
	exports := v.m.compiled.ExportedFunctions()
	ok := !v.noVersion
	for _, e := range requiredExports[1:] {
		if err := checkSignature(exports, e); err != nil {
			v.add("exports", Fail, "%v (models/ABI.md)", err)
			ok = false
			if e.name == "ef_metadata" {
				v.noMetadata = true
			} else {
				v.noCalls = true
			}
			if v.failFast {
				return
			}
		}
	}
	if _, has := v.m.compiled.ExportedMemories()["memory"]; !has {
		v.add("exports", Fail, "module does not export its memory as \"memory\" (models/ABI.md)")
		v.noCalls, v.noMetadata, ok = true, true, false
	}
	if ok {
		v.add("exports", Pass, "exports: memory, ef_abi_version, ef_alloc, ef_infer, ef_last_error, ef_metadata")
	}
	if v.noCalls {
		v.noMetadata = true
	}
}

// checkMetadata compares what the module says it is with the manifest: a
// bundle whose module is another model, or another version, is a
// packaging mistake that must not reach a device.
func (v *verifier) checkMetadata(ctx context.Context) {
	inst := v.inst
	v.inst = nil
	defer func() {
		if inst == nil {
			return
		}
		if inst.broken {
			v.m.closeInstance(ctx, inst)
			v.m.release()
			return
		}
		v.m.put(inst)
	}()
	if inst == nil || inst.broken || v.noMetadata {
		v.add("metadata", Fail, "not read: fix the problems above first")
		return
	}
	raw, err := inst.metadata(ctx)
	if err != nil {
		v.add("metadata", Fail, "ef_metadata: %v", err)
		return
	}
	v.compareMetadata(raw)
}

func (v *verifier) compareMetadata(raw []byte) {
	var md struct {
		Name    string        `json:"name"`
		Version string        `json:"version"`
		Inputs  []tensor.Spec `json:"inputs"`
		Outputs []tensor.Spec `json:"outputs"`
	}
	if err := json.Unmarshal(raw, &md); err != nil {
		v.add("metadata", Fail, "ef_metadata returned invalid JSON: %v", err)
		return
	}
	man := &v.m.manifest
	ok := true
	if md.Name != man.Name || md.Version != man.Version {
		v.add("metadata", Fail, "module says it is %s %s; rebuild the bundle from the right module", md.Name, md.Version)
		ok = false
	}
	if md.Inputs != nil && !sameSpecs(md.Inputs, v.m.inputs) {
		v.add("metadata", Fail, "module inputs %v differ from the manifest's %v", md.Inputs, v.m.inputs)
		ok = false
	}
	if md.Outputs != nil && !sameSpecs(md.Outputs, v.m.outputs) {
		v.add("metadata", Fail, "module outputs %v differ from the manifest's %v", md.Outputs, v.m.outputs)
		ok = false
	}
	if ok {
		v.m.meta = raw
		v.add("metadata", Pass, "metadata matches the manifest (%s %s)", md.Name, md.Version)
	}
}

// maxMismatches caps the element mismatches listed for one test vector.
const maxMismatches = 5

// runGolden runs every well-formed golden vector.
func (v *verifier) runGolden(ctx context.Context) {
	if v.noCalls {
		if len(v.tests) > 0 {
			v.add("golden", Fail, "golden tests not run: fix the problems above first")
		}
		return
	}
	n := len(v.tests)
	for k, tc := range v.tests {
		if tc.in == nil {
			continue
		}
		label := fmt.Sprintf("golden %d/%d", k+1, n)
		// Golden tests check answers, not speed: a device busy installing
		// an update must not refuse a good model over a slow first call.
		// The bound still stops a model that never answers.
		start := time.Now()
		out, err := v.m.infer(ctx, tc.in, min(10*v.m.timeout, instantiateTimeout))
		took := time.Since(start)
		if err == nil {
			err = compareOutputs(out, tc.tv)
		}
		if err != nil {
			v.add(label, Fail, "golden test %d of %d failed: %v; the module does not reproduce the manifest's test vectors", k+1, n, err)
			if v.failFast {
				return
			}
			continue
		}
		if took > v.m.timeout {
			v.add(label, Warn, "golden test %d of %d passed but took %v, over the %v inference deadline: on a device such calls would time out", k+1, n, took.Round(time.Microsecond), v.m.timeout)
			continue
		}
		v.add(label, Pass, "golden test %d of %d passed (%v)", k+1, n, took.Round(time.Microsecond))
	}
}

// compareOutputs checks every expected output of tv against out, listing
// the mismatching elements (a few of them) of every output.
func compareOutputs(out []tensor.Tensor, tv bundle.TestVector) error {
	tol := tv.Tolerance
	if tol <= 0 {
		tol = DefaultTolerance
	}
	var problems []string
	for _, want := range tv.Outputs {
		var got *tensor.Tensor
		for i := range out {
			if out[i].Name == want.Name {
				got = &out[i]
			}
		}
		if got == nil {
			problems = append(problems, fmt.Sprintf("output %q missing", want.Name))
			continue
		}
		if got.DType.String() != want.Datatype || !(tensor.Spec{Shape: want.Shape}).ShapeMatches(got.Shape) {
			problems = append(problems, fmt.Sprintf("output %q is %s%v, want %s%v", want.Name, got.DType, got.Shape, want.Datatype, want.Shape))
			continue
		}
		vals, err := got.Float64s()
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		if len(vals) != len(want.Data) {
			problems = append(problems, fmt.Sprintf("output %q has %d elements, want %d", want.Name, len(vals), len(want.Data)))
			continue
		}
		bad := 0
		for i, w := range want.Data {
			if d := math.Abs(vals[i] - w); !(d <= tol) {
				if bad < maxMismatches {
					problems = append(problems, fmt.Sprintf("output %q element %d is %v, want %v (tolerance %g)", want.Name, i, vals[i], w, tol))
				}
				bad++
			}
		}
		if bad > maxMismatches {
			problems = append(problems, fmt.Sprintf("and %d more elements of %q", bad-maxMismatches, want.Name))
		}
	}
	if len(problems) == 0 {
		return nil
	}
	msg := problems[0]
	for _, p := range problems[1:] {
		msg += "; " + p
	}
	return errors.New(msg)
}
