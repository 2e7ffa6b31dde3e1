package host_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/examples/testmodels"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
)

func check(t *testing.T, h *host.Host, b *bundle.Bundle) *host.Report {
	t.Helper()
	r, err := h.Check(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// findings renders a report's problems one per line, for messages.
func findings(r *host.Report) string {
	var b strings.Builder
	for _, f := range r.Findings {
		b.WriteString(f.Severity.String() + " " + f.Check + ": " + f.Message + "\n")
	}
	return b.String()
}

// wantProblems fails unless r holds, for each want, a failure whose check
// and message contain it, and no other failure.
func wantProblems(t *testing.T, r *host.Report, want ...[2]string) {
	t.Helper()
	var fails []host.Finding
	for _, f := range r.Findings {
		if f.Severity == host.Fail {
			fails = append(fails, f)
		}
	}
	matched := make([]bool, len(fails))
	for _, w := range want {
		found := false
		for i, f := range fails {
			if !matched[i] && strings.Contains(f.Check, w[0]) && strings.Contains(f.Message, w[1]) {
				matched[i], found = true, true
				break
			}
		}
		if !found {
			t.Errorf("no failure %q: %q in the report:\n%s", w[0], w[1], findings(r))
		}
	}
	for i, f := range fails {
		if !matched[i] {
			t.Errorf("unexpected failure %s: %s", f.Check, f.Message)
		}
	}
	if r.OK() != (len(want) == 0) || (r.Err() == nil) != (len(want) == 0) {
		t.Errorf("OK() = %v, Err() = %v with %d problems", r.OK(), r.Err(), len(want))
	}
}

func TestCheckGoodBundle(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	r := check(t, h, example(t, "1.0.0"))
	wantProblems(t, r)
	if r.Name != "grid-anomaly" || r.Version != "1.0.0" || r.ABI != 1 || r.Digest == "" {
		t.Fatalf("report header %+v", r)
	}
	passed := map[string]bool{}
	for _, f := range r.Findings {
		if f.Severity == host.Pass {
			passed[f.Check] = true
		}
	}
	for _, c := range []string{"manifest", "limits", "tests", "module", "imports", "abi", "exports", "metadata", "golden 1/4", "golden 4/4"} {
		if !passed[c] {
			t.Errorf("no passed check %q in\n%s", c, findings(r))
		}
	}
	// The checked model is not kept: the host holds nothing more after.
	if err := h.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Check(context.Background(), example(t, "1.0.0")); !errors.Is(err, host.ErrClosed) {
		t.Fatalf("check on a closed host: %v", err)
	}
}

// TestCheckReportsEveryProblem: a bundle broken in many ways gets every
// problem listed, where Load names only the first.
func TestCheckReportsEveryProblem(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{MaxMemoryPages: 256})

	t.Run("golden vectors", func(t *testing.T) {
		// All four of the wrong variant's vectors fail, each reported.
		r := check(t, h, modeltest.TestModelBundle(t, "grid-anomaly", testmodels.Wrong))
		wantProblems(t, r,
			[2]string{"golden 1/4", `output "score" element 0 is 0.98`},
			[2]string{"golden 2/4", "element 0"},
			[2]string{"golden 3/4", "element 0"},
			[2]string{"golden 4/4", `element 2`},
		)
	})

	t.Run("manifest", func(t *testing.T) {
		ident := identityBundle(t, "identity", 0)
		man := ident.Manifest
		man.Name = "other"                                                // metadata disagrees
		man.Limits = bundle.Limits{MemoryPages: 70000, TimeoutMillis: -5} // two limit problems
		tv := man.Tests[0]
		vec := func(in, out []float64, tol float64) bundle.TestVector {
			return bundle.TestVector{
				Inputs:    []bundle.TensorValue{{Name: "x", Datatype: "FP32", Shape: []int64{int64(len(in))}, Data: in}},
				Outputs:   []bundle.TensorValue{{Name: "y", Datatype: "FP32", Shape: []int64{int64(len(out))}, Data: out}},
				Tolerance: tol,
			}
		}
		noInput := vec([]float64{1}, []float64{1}, 0)
		noInput.Inputs[0].Name = "z"
		man.Tests = []bundle.TestVector{
			tv,                                    // passes
			noInput,                               // malformed: no such input
			vec([]float64{1}, []float64{1}, -1),   // malformed: negative tolerance
			vec([]float64{1, 2}, []float64{1}, 0), // malformed: one value for two
			vec([]float64{1, 2}, []float64{1, 3}, 0.5), // runs, and fails
		}
		man.Tests[3].Outputs[0].Shape = []int64{2}
		b := modeltest.Bundle(t, man, ident.Module)
		r := check(t, h, b)
		wantProblems(t, r,
			[2]string{"limits", "over the WebAssembly maximum"},
			[2]string{"limits", "negative"},
			[2]string{"golden 2/5", `input tensor "x" is missing`},
			[2]string{"golden 3/5", "tolerance -1"},
			[2]string{"golden 4/5", `expected output "y" has 1 values for shape [2]`},
			[2]string{"metadata", "module says it is identity 1.0.0"},
			[2]string{"golden 5/5", "element 1 is 2, want 3 (tolerance 0.5)"},
		)
		// Load stops at the first.
		_, err := h.Load(context.Background(), b)
		if !errors.Is(err, host.ErrRefused) || !strings.Contains(err.Error(), "WebAssembly maximum") {
			t.Fatalf("load: %v", err)
		}
	})

	t.Run("module", func(t *testing.T) {
		// A hand-made module lacking two exports, importing from env and
		// not exporting its memory.
		mod := abiModule().drop("ef_infer").drop("ef_last_error")
		mod.imports = []wimport{{module: "env", name: "peek", results: []byte{i32}}}
		man := bundle.Manifest{
			ABI: 1, Name: "hand", Version: "1.0.0",
			Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
			Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
			Limits:  bundle.Limits{MemoryPages: 16},
			Tests: []bundle.TestVector{{
				Inputs:  []bundle.TensorValue{{Name: "x", Datatype: "FP32", Shape: []int64{1}, Data: []float64{1}}},
				Outputs: []bundle.TensorValue{{Name: "y", Datatype: "FP32", Shape: []int64{1}, Data: []float64{1}}},
			}},
		}
		r := check(t, h, modeltest.Bundle(t, man, mod.encode()))
		wantProblems(t, r,
			[2]string{"imports", "imports env.peek"},
			[2]string{"instance", "not instantiated"},
			[2]string{"exports", "does not export ef_infer"},
			[2]string{"exports", "does not export ef_last_error"},
			[2]string{"metadata", "not read"},
			[2]string{"golden", "not run"},
		)
	})

	t.Run("other ABI", func(t *testing.T) {
		ident := identityBundle(t, "identity", 0)
		man := ident.Manifest
		man.ABI = 2
		r := check(t, h, modeltest.Bundle(t, man, ident.Module))
		wantProblems(t, r,
			[2]string{"manifest", "manifest asks for model ABI v2; this host speaks model ABI v1"},
			[2]string{"abi", "module speaks model ABI v1 but the manifest says v2"},
		)
		mod := modeltest.BuildGuest(t, "testdata/abi2", "1.0.0")
		r = check(t, h, modeltest.Bundle(t, bundle.Manifest{
			Name: "abi2", Version: "1.0.0", Limits: bundle.Limits{MemoryPages: 256},
			Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
			Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
		}, mod))
		if r.OK() || !strings.Contains(findings(r), "module speaks model ABI v2; this host speaks model ABI v1") {
			t.Fatalf("ABI v2 module:\n%s", findings(r))
		}
	})
}

func TestCheckWarnings(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{MaxMemoryPages: 256})
	ident := identityBundle(t, "identity", 0)
	man := ident.Manifest
	man.Tests = nil
	man.Limits = bundle.Limits{TimeoutMillis: 120000} // no memory limit, a very long deadline
	r := check(t, h, modeltest.Bundle(t, man, ident.Module))
	wantProblems(t, r)
	warns := 0
	for _, f := range r.Problems() {
		if f.Severity != host.Warn {
			t.Fatalf("problem %+v is not a warning", f)
		}
		warns++
	}
	if warns != 3 || r.Count(host.Warn) != 3 || !strings.Contains(findings(r), "no golden test vectors") ||
		!strings.Contains(findings(r), "memoryPages is not set") || !strings.Contains(findings(r), "stuck call") {
		t.Fatalf("want 3 warnings (no tests, no memory limit, long deadline):\n%s", findings(r))
	}
}

func TestCheckFile(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	good := identityBundle(t, "identity", 0)
	data, err := good.Encode()
	if err != nil {
		t.Fatal(err)
	}
	r, err := h.CheckFile(context.Background(), data)
	if err != nil {
		t.Fatal(err)
	}
	wantProblems(t, r)

	// A manifest edited after packing (unknown field, wrong golden value)
	// and a module that no longer matches its pin: Decode stops at the
	// first, CheckFile reads on and reports the golden failure as well.
	var man map[string]any
	if err := json.Unmarshal(good.ManifestJSON, &man); err != nil {
		t.Fatal(err)
	}
	man["colour"] = "blue"
	man["tests"].([]any)[0].(map[string]any)["outputs"].([]any)[0].(map[string]any)["data"] = []float64{1, -2, 0.75}
	mj, _ := json.Marshal(man)
	r, err = h.CheckFile(context.Background(), tarOf(t, map[string][]byte{"manifest.json": mj, "model.wasm": good.Module}))
	if err != nil {
		t.Fatal(err)
	}
	wantProblems(t, r,
		[2]string{"bundle", `unknown field "colour"`},
		[2]string{"golden 1/1", "element 2 is 0.5, want 0.75"},
	)

	for name, data := range map[string][]byte{
		"not a tar":   []byte("hello"),
		"no module":   tarOf(t, map[string][]byte{"manifest.json": mj}),
		"no manifest": tarOf(t, map[string][]byte{"model.wasm": good.Module}),
		"bad json":    tarOf(t, map[string][]byte{"manifest.json": []byte("{"), "model.wasm": good.Module}),
	} {
		r, err := h.CheckFile(context.Background(), data)
		if err != nil {
			t.Fatal(err)
		}
		if r.OK() || len(r.Findings) == 0 || r.Findings[0].Check != "bundle" {
			t.Fatalf("%s: report\n%s", name, findings(r))
		}
	}
}

func tarOf(t *testing.T, members map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range []string{"manifest.json", "model.wasm"} {
		data, ok := members[name]
		if !ok {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestABIExampleModule: the minimal module that models/ABI.md shows
// (testdata/identity, compiled from its text) conforms.
func TestABIExampleModule(t *testing.T) {
	t.Parallel()
	mod, err := os.ReadFile("testdata/identity/identity.wasm")
	if err != nil {
		t.Fatal(err)
	}
	h := newHost(t, host.Options{})
	man := identityBundle(t, "identity", 0).Manifest
	r := check(t, h, modeltest.Bundle(t, man, mod))
	wantProblems(t, r)
	if r.Count(host.Warn) != 0 || !strings.Contains(findings(r), "imports: none") {
		t.Fatalf("report:\n%s", findings(r))
	}
	m := load(t, h, modeltest.Bundle(t, man, mod))
	out, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{2}, []float32{1, 2})})
	if err != nil {
		t.Fatal(err)
	}
	if y, _ := out[0].Float32s(); out[0].Name != "y" || len(y) != 2 || y[0] != 1 || y[1] != 2 {
		t.Fatalf("identity answered %+v", out)
	}
}
