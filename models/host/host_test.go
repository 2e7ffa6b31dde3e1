package host_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// misbehave is testdata/misbehave's module, built once per test binary.
var misbehave struct {
	once   sync.Once
	module []byte
}

func example(t *testing.T, version string) *bundle.Bundle {
	t.Helper()
	return modeltest.ExampleBundle(t, "grid-anomaly", version)
}

// misbehaveBundle packs testdata/misbehave (which doubles its input and
// misbehaves on negative codes) with the given limits.
func misbehaveBundle(t *testing.T, limits bundle.Limits) *bundle.Bundle {
	t.Helper()
	misbehave.once.Do(func() { misbehave.module = modeltest.BuildGuest(t, "testdata/misbehave", "1.0.0") })
	if misbehave.module == nil {
		t.Fatal("misbehave guest did not build")
	}
	return modeltest.Bundle(t, bundle.Manifest{
		Name:    "misbehave",
		Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
		Limits:  limits,
		Tests: []bundle.TestVector{{
			Inputs:  []bundle.TensorValue{{Name: "x", Datatype: "FP32", Shape: []int64{2}, Data: []float64{1, 2.5}}},
			Outputs: []bundle.TensorValue{{Name: "y", Datatype: "FP32", Shape: []int64{2}, Data: []float64{2, 5}}},
		}},
	}, misbehave.module)
}

// newHost is modeltest.NewHost with a generous default deadline: the
// machine running the tests may be busy, and only the tests about
// deadlines set short ones.
func newHost(t *testing.T, o host.Options) *host.Host {
	t.Helper()
	if o.DefaultTimeout == 0 {
		o.DefaultTimeout = 10 * time.Second
	}
	return modeltest.NewHost(t, o)
}

func load(t *testing.T, h *host.Host, b *bundle.Bundle) *host.Model {
	t.Helper()
	m, err := h.Load(context.Background(), b)
	if err != nil {
		t.Fatalf("load %s %s: %v", b.Manifest.Name, b.Manifest.Version, err)
	}
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m
}

// refScore is grid-anomaly's formula written again from its README, so the
// host's answers are checked against an implementation that shares no code
// with the module.
func refScore(version string, v, a, f, c float64) float32 {
	scaleHz, mid := 0.5, 1.0
	if version == "1.1.0" {
		scaleHz, mid = 0.2, 0.8
	}
	d := math.Sqrt(math.Pow((v-230)/23, 2) + math.Pow(math.Max(0, a-16)/4, 2) +
		math.Pow((f-50)/scaleHz, 2) + math.Pow(math.Max(0, c-40)/15, 2))
	return float32(1 / (1 + math.Exp(-4*(d-mid))))
}

var rows = [][4]float32{
	{230, 10, 50, 25},
	{241.5, 12, 50.1, 30},
	{207, 18, 49.9, 42},
	{236, 12, 49.6, 61},
	{180, 30, 48.5, 90},
}

func readings(rs ...[4]float32) tensor.Tensor {
	var v []float32
	for _, r := range rs {
		v = append(v, r[:]...)
	}
	return tensor.FromFloat32("readings", []int64{int64(len(rs)), 4}, v)
}

func scores(t *testing.T, out []tensor.Tensor) []float32 {
	t.Helper()
	if len(out) != 1 || out[0].Name != "score" {
		t.Fatalf("outputs %+v, want one named score", out)
	}
	s, err := out[0].Float32s()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLoadAndInferExample(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	got := map[string][]float32{}
	for _, version := range []string{"1.0.0", "1.1.0"} {
		t.Run(version, func(t *testing.T) {
			m := load(t, h, example(t, version))
			if m.Manifest().Version != version || m.Manifest().Name != "grid-anomaly" {
				t.Fatalf("manifest %+v", m.Manifest())
			}
			if !bytes.Contains(m.Metadata(), []byte(`"version":"`+version+`"`)) {
				t.Fatalf("metadata %s", m.Metadata())
			}
			out, err := m.Infer(context.Background(), []tensor.Tensor{readings(rows...)})
			if err != nil {
				t.Fatal(err)
			}
			s := scores(t, out)
			if len(s) != len(rows) {
				t.Fatalf("%d scores for %d rows", len(s), len(rows))
			}
			for i, r := range rows {
				want := refScore(version, float64(r[0]), float64(r[1]), float64(r[2]), float64(r[3]))
				if math.Abs(float64(s[i]-want)) > 1e-6 || s[i] < 0 || s[i] > 1 {
					t.Errorf("row %d %v: score %v, want %v", i, r, s[i], want)
				}
			}
			got[version] = s
		})
	}
	if len(got) == 2 && math.Abs(float64(got["1.0.0"][2]-got["1.1.0"][2])) < 0.05 {
		t.Fatalf("1.0.0 and 1.1.0 score alike (%v, %v); a rollout would not show", got["1.0.0"], got["1.1.0"])
	}
}

func TestInferBatchSizes(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	m := load(t, h, example(t, "1.0.0"))
	// Zero rows, and enough rows to outgrow the first buffers (16 bytes a
	// row in, 4 out: 20000 rows is 320 KB in, 80 KB out).
	for _, n := range []int{0, 1, 20000} {
		rs := make([][4]float32, n)
		for i := range rs {
			rs[i] = rows[i%len(rows)]
		}
		out, err := m.Infer(context.Background(), []tensor.Tensor{readings(rs...)})
		if err != nil {
			t.Fatalf("%d rows: %v", n, err)
		}
		s := scores(t, out)
		if len(s) != n {
			t.Fatalf("%d rows gave %d scores", n, len(s))
		}
		for i := range s {
			r := rs[i]
			if want := refScore("1.0.0", float64(r[0]), float64(r[1]), float64(r[2]), float64(r[3])); math.Abs(float64(s[i]-want)) > 1e-6 {
				t.Fatalf("%d rows: row %d scored %v, want %v", n, i, s[i], want)
			}
		}
	}
}

func TestConcurrentInfer(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{PoolSize: 3})
	m := load(t, h, example(t, "1.1.0"))
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				n := 1 + (g+i)%len(rows)
				out, err := m.Infer(context.Background(), []tensor.Tensor{readings(rows[:n]...)})
				if err != nil {
					errs <- err
					return
				}
				s, _ := out[0].Float32s()
				for j := 0; j < n; j++ {
					r := rows[j]
					if want := refScore("1.1.0", float64(r[0]), float64(r[1]), float64(r[2]), float64(r[3])); len(s) != n || math.Abs(float64(s[j]-want)) > 1e-6 {
						errs <- fmt.Errorf("goroutine %d call %d: scores %v", g, i, s)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestInferRefusesInputsNotInManifest(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	m := load(t, h, example(t, "1.0.0"))
	tests := []struct {
		name string
		in   []tensor.Tensor
	}{
		{"no inputs", nil},
		{"wrong name", []tensor.Tensor{tensor.FromFloat32("reading", []int64{1, 4}, make([]float32, 4))}},
		{"wrong width", []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 3}, make([]float32, 3))}},
		{"wrong rank", []tensor.Tensor{tensor.FromFloat32("readings", []int64{4}, make([]float32, 4))}},
		{"wrong dtype", []tensor.Tensor{{Name: "readings", DType: tensor.FP64, Shape: []int64{1, 4}, Data: make([]byte, 32)}}},
		{"data short of shape", []tensor.Tensor{tensor.FromFloat32("readings", []int64{2, 4}, make([]float32, 4))}},
		{"extra input", []tensor.Tensor{readings(rows[0]), tensor.FromFloat32("x", []int64{1}, []float32{1})}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := m.Infer(context.Background(), tt.in)
			if !errors.Is(err, host.ErrBadInput) {
				t.Fatalf("err = %v, want ErrBadInput", err)
			}
		})
	}
	// The guest's own refusal (a NaN reading) is bad input too.
	_, err := m.Infer(context.Background(), []tensor.Tensor{readings([4]float32{230, float32(math.NaN()), 50, 25})})
	if !errors.Is(err, host.ErrBadInput) || !strings.Contains(err.Error(), "non-finite") {
		t.Fatalf("NaN reading: err = %v, want ErrBadInput naming the row", err)
	}
}

func TestLoadRefusesWrongGolden(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	good := example(t, "1.0.0")
	man := good.Manifest
	man.Tests = append([]bundle.TestVector(nil), man.Tests...)
	tv := man.Tests[1]
	tv.Outputs = []bundle.TensorValue{tv.Outputs[0]}
	tv.Outputs[0].Data = []float64{tv.Outputs[0].Data[0] + 0.01}
	man.Tests[1] = tv
	_, err := h.Load(context.Background(), modeltest.Bundle(t, man, good.Module))
	if !errors.Is(err, host.ErrRefused) || !strings.Contains(err.Error(), "golden test 2 of 4") {
		t.Fatalf("err = %v, want a refusal naming golden test 2", err)
	}
	// The same vector within a looser tolerance passes.
	man.Tests[1].Tolerance = 0.02
	m, err := h.Load(context.Background(), modeltest.Bundle(t, man, good.Module))
	if err != nil {
		t.Fatalf("tolerance 0.02: %v", err)
	}
	m.Close(context.Background())
}

func TestLoadRefusesMismatchedManifest(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	good := example(t, "1.0.0")
	tests := []struct {
		name   string
		change func(*bundle.Manifest)
		want   string
	}{
		{"other version", func(m *bundle.Manifest) { m.Version = "1.1.0"; m.Tests = nil }, "module says it is grid-anomaly 1.0.0"},
		{"other name", func(m *bundle.Manifest) { m.Name = "other" }, "module says it is grid-anomaly"},
		{"other inputs", func(m *bundle.Manifest) {
			m.Inputs = []bundle.TensorSpec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 5}}}
			m.Tests, m.Reference = nil, nil // the reference has 4 feature histograms
		}, "inputs"},
		{"abi 2", func(m *bundle.Manifest) { m.ABI = 2 }, "manifest asks for model ABI v2; this host speaks model ABI v1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			man := good.Manifest
			man.Inputs = append([]bundle.TensorSpec(nil), man.Inputs...)
			man.Outputs = append([]bundle.TensorSpec(nil), man.Outputs...)
			tt.change(&man)
			_, err := h.Load(context.Background(), modeltest.Bundle(t, man, good.Module))
			if !errors.Is(err, host.ErrRefused) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want a refusal containing %q", err, tt.want)
			}
		})
	}
}

func TestLoadRefusesOtherABIVersion(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	mod := modeltest.BuildGuest(t, "testdata/abi2", "1.0.0")
	b := modeltest.Bundle(t, bundle.Manifest{
		Name: "abi2", Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
	}, mod)
	_, err := h.Load(context.Background(), b)
	if !errors.Is(err, host.ErrRefused) || !strings.Contains(err.Error(), "module speaks model ABI v2; this host speaks model ABI v1") {
		t.Fatalf("err = %v, want a refusal naming v2 and v1", err)
	}
}

// TestLoadRefusesBrokenModules feeds hand-made modules that break the ABI
// in one way each.
func TestLoadRefusesBrokenModules(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{CacheDir: t.TempDir()})
	tests := []struct {
		name string
		mod  wmodule
		want string
	}{
		{"not wasm", wmodule{}, "does not compile"},
		{"no ef_abi_version", abiModule().drop("ef_abi_version"), "does not export ef_abi_version"},
		{"no ef_infer", abiModule().drop("ef_infer"), "does not export ef_infer"},
		{"no memory", func() wmodule { m := abiModule(); m.pages, m.data = 0, nil; return m }(), "does not compile"},
		{"ef_alloc takes i64", abiModule(wfunc{export: "ef_alloc", params: []byte{i64}, results: []byte{i32}, body: constI32(1024)}), "export ef_alloc has signature [i64] -> [i32]"},
		{"abi version 7", abiModule(wfunc{export: "ef_abi_version", results: []byte{i32}, body: constI32(7)}), "module speaks model ABI v7; this host speaks model ABI v1"},
		{"imports env", func() wmodule {
			m := abiModule()
			m.imports = []wimport{{module: "env", name: "peek", results: []byte{i32}}}
			return m
		}(), "imports env.peek"},
		{"command module", abiModule(wfunc{export: "_start"}), "WASI command"},
		{"start traps", abiModule(wfunc{export: "_initialize", body: []byte{0x00}}), "instantiate"},
		{"abi version traps", abiModule(wfunc{export: "ef_abi_version", results: []byte{i32}, body: cat([]byte{0x00}, constI32(1))}), "ef_abi_version: model trapped"},
		{"alloc outside memory", abiModule(wfunc{export: "ef_alloc", params: []byte{i32}, results: []byte{i32}, body: constI32(200000)}), "outside the module's"},
		{"alloc fails", abiModule(wfunc{export: "ef_alloc", params: []byte{i32}, results: []byte{i32}, body: constI32(0)}), "out of memory"},
		{"metadata fails", abiModule(wfunc{export: "ef_metadata", params: []byte{i32, i32}, results: []byte{i32}, body: constI32(-3)}), "ef_metadata"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mod := tt.mod.encode()
			if tt.name == "not wasm" {
				mod = []byte("\x00asm\x01\x00\x00\x00garbage")
			}
			man := bundle.Manifest{
				ABI: 1, Name: "hand", Version: "1.0.0",
				Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
				Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
			}
			_, err := h.Load(context.Background(), modeltest.Bundle(t, man, mod))
			if !errors.Is(err, host.ErrRefused) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want a refusal containing %q", err, tt.want)
			}
		})
	}
	// The unbroken hand-made module loads: the refusals above are each
	// down to the one thing broken.
	man := bundle.Manifest{
		ABI: 1, Name: "hand", Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
	}
	m, err := h.Load(context.Background(), modeltest.Bundle(t, man, abiModule().encode()))
	if err != nil {
		t.Fatalf("intact hand-made module: %v", err)
	}
	m.Close(context.Background())
}

// TestHandMadeInferFailures covers guest answers a Go guest never gives.
func TestHandMadeInferFailures(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{CacheDir: t.TempDir()})
	man := bundle.Manifest{
		ABI: 1, Name: "hand", Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
		Limits:  bundle.Limits{TimeoutMillis: 500},
	}
	infer := func(body []byte) wfunc {
		return wfunc{export: "ef_infer", params: []byte{i32, i32, i32, i32}, results: []byte{i32}, body: body}
	}
	tests := []struct {
		name string
		fn   wfunc
		want error
		msg  string
	}{
		{"length over capacity", infer(cat(localGet(3), constI32(1), []byte{0x6a})), host.ErrGuest, "returned length"}, // out_cap + 1
		{"garbage output", infer(constI32(8)), host.ErrGuest, "output frame"},
		{"always too small", infer(constI32(-2)), host.ErrGuest, "output"},
		{"unknown code", infer(constI32(-77)), host.ErrGuest, "code -77"},
		{"bad input code", infer(constI32(-1)), host.ErrBadInput, "no message"},
		{"trap", infer([]byte{0x00}), host.ErrTrap, "unreachable"},
		{"loops", infer(cat(loopForever, constI32(0))), host.ErrTimeout, "deadline"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := load(t, h, modeltest.Bundle(t, man, abiModule(tt.fn).encode()))
			_, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{1})})
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want %v containing %q", err, tt.want, tt.msg)
			}
		})
	}
}

func TestGuestFailures(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{PoolSize: 1})
	// A generous deadline: under -race on a busy machine, running out of
	// memory takes the Go guest seconds.
	m := load(t, h, misbehaveBundle(t, bundle.Limits{TimeoutMillis: 20000, MemoryPages: 128}))
	tests := []struct {
		name string
		code float32
		want error
		msg  string
	}{
		{"error", -1, host.ErrGuest, "asked to fail"},
		{"bad input", -2, host.ErrBadInput, "asked to refuse"},
		{"panic", -3, host.ErrGuest, "panicked: asked to panic"},
		{"exit", -4, host.ErrTrap, "exited with code 3"},
		{"out of memory", -6, host.ErrTrap, "unreachable"},
		{"undeclared output", -9, host.ErrGuest, "do not match"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{tt.code})})
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want %v containing %q", err, tt.want, tt.msg)
			}
			// Whatever happened, the model still answers.
			checkDoubles(t, m, []float32{1.5, -0.25})
		})
	}
}

func checkDoubles(t *testing.T, m *host.Model, x []float32) {
	t.Helper()
	out, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{int64(len(x))}, x)})
	if err != nil {
		t.Fatalf("model no longer answers: %v", err)
	}
	y, _ := out[0].Float32s()
	for i := range x {
		if len(y) != len(x) || y[i] != 2*x[i] {
			t.Fatalf("doubling %v gave %v", x, y)
		}
	}
}

// TestSandbox: the guest reaches no files, environment or arguments.
func TestSandbox(t *testing.T) {
	t.Setenv("EDGEFLEET_SECRET", "x") // would show if the environment leaked
	h := newHost(t, host.Options{})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{}))
	out, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-10})})
	if err != nil {
		t.Fatal(err)
	}
	if y, _ := out[0].Float32s(); y[0] != 0 {
		t.Fatalf("the guest reached %v host capabilities, want none", y[0])
	}
	if _, err := os.Stat("/tmp/edgefleet-guest-was-here"); err == nil {
		t.Fatal("the guest wrote a file on the host")
	}
}

func TestBigOutputGrowsBuffer(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{PoolSize: 1})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{}))
	for i := 0; i < 2; i++ { // the second call finds the grown buffer
		out, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-7})})
		if err != nil {
			t.Fatal(err)
		}
		if out[0].Len() != 100000 {
			t.Fatalf("got %d elements, want 100000", out[0].Len())
		}
	}
}

func TestDeadlineStopsRunawayGuest(t *testing.T) {
	const timeout = 100 * time.Millisecond
	h := newHost(t, host.Options{PoolSize: 1})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{TimeoutMillis: int(timeout / time.Millisecond)}))
	// Every call must time out and leave the model answering; the best of
	// three must be within 20ms of the deadline (one slow call can be the
	// machine's fault when other test binaries share its two cores).
	best := time.Hour
	for i := 0; i < 3; i++ {
		start := time.Now()
		_, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-5})})
		took := time.Since(start)
		if !errors.Is(err, host.ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want ErrTimeout", err)
		}
		if took < timeout {
			t.Fatalf("returned after %v, before the %v deadline", took, timeout)
		}
		best = min(best, took)
		t.Logf("runaway call returned after %v (deadline %v)", took, timeout)
		checkDoubles(t, m, []float32{3})
	}
	if best > timeout+20*time.Millisecond {
		t.Fatalf("runaway calls returned after %v at best, deadline %v + 20ms", best, timeout)
	}
}

func TestHostDefaultTimeout(t *testing.T) {
	h := newHost(t, host.Options{DefaultTimeout: 30 * time.Millisecond})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{}))
	start := time.Now()
	_, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-5})})
	// Well under the 1s built-in default: the host's DefaultTimeout applied.
	if took := time.Since(start); !errors.Is(err, host.ErrTimeout) || took < 30*time.Millisecond || took > 500*time.Millisecond {
		t.Fatalf("err = %v after %v, want ErrTimeout after 30ms", err, took)
	}
}

func TestCallerCancel(t *testing.T) {
	h := newHost(t, host.Options{PoolSize: 1})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{TimeoutMillis: 5000}))
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(30*time.Millisecond, cancel)
	_, err := m.Infer(ctx, []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-5})})
	if !errors.Is(err, context.Canceled) || errors.Is(err, host.ErrTimeout) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	checkDoubles(t, m, []float32{4})
}

func TestPoolWaitHonoursContext(t *testing.T) {
	h := newHost(t, host.Options{PoolSize: 1})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{TimeoutMillis: 500}))
	go m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-5})})
	time.Sleep(100 * time.Millisecond) // let it take the only instance
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := m.Infer(ctx, []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{1})})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "waiting for a free instance") {
		t.Fatalf("err = %v, want a deadline while waiting for the pool", err)
	}
	checkDoubles(t, m, []float32{5}) // waits for the spinner's deadline, then runs
}

func TestMemoryLimit(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{MaxMemoryPages: 32}) // 2 MiB: a Go guest starts with more
	_, err := h.Load(context.Background(), misbehaveBundle(t, bundle.Limits{}))
	if !errors.Is(err, host.ErrRefused) {
		t.Fatalf("err = %v, want a refusal", err)
	}
	if _, err := host.New(context.Background(), host.Options{MaxMemoryPages: 65537}); err == nil {
		t.Fatal("MaxMemoryPages over 4 GiB accepted")
	}
}

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestGuestStderrIsLogged(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	h := newHost(t, host.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	m := load(t, h, misbehaveBundle(t, bundle.Limits{}))
	for i := 0; i < 50; i++ {
		if _, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-8})}); err != nil {
			t.Fatal(err)
		}
	}
	got := logs.String()
	if n := strings.Count(got, "guest: hello from the guest"); n < 1 || n > 40 {
		t.Fatalf("guest line logged %d times for 50 calls, want 1 to 40 (rate-limited):\n%s", n, got)
	}
	if !strings.Contains(got, "model=misbehave") || !strings.Contains(got, "stream=stderr") {
		t.Fatalf("log lines lack model and stream:\n%s", got)
	}
}

func TestClose(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h, err := host.New(ctx, host.Options{CacheDir: modeltest.CompilationCacheDir()})
	if err != nil {
		t.Fatal(err)
	}
	m1, err := h.Load(ctx, misbehaveBundle(t, bundle.Limits{}))
	if err != nil {
		t.Fatal(err)
	}
	m2, err := h.Load(ctx, misbehaveBundle(t, bundle.Limits{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := m1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	in := []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{1})}
	if _, err := m1.Infer(ctx, in); !errors.Is(err, host.ErrClosed) {
		t.Fatalf("infer on a closed model: %v, want ErrClosed", err)
	}
	checkDoubles(t, m2, []float32{1}) // closing one model leaves the other
	if err := h.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := m2.Infer(ctx, in); !errors.Is(err, host.ErrClosed) {
		t.Fatalf("infer after host close: %v, want ErrClosed", err)
	}
	if _, err := h.Load(ctx, misbehaveBundle(t, bundle.Limits{})); err == nil {
		t.Fatal("load on a closed host succeeded")
	}
	if err := m1.Close(ctx); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

func TestCloseWhileInferring(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHost(t, host.Options{})
	m, err := h.Load(ctx, misbehaveBundle(t, bundle.Limits{TimeoutMillis: 5000}))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() {
		_, err := m.Infer(ctx, []tensor.Tensor{tensor.FromFloat32("x", []int64{1}, []float32{-5})})
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, host.ErrClosed) {
			t.Fatalf("in-flight call: %v, want ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("closing the model did not stop the call in flight")
	}
}

func TestPrecompileFillsDiskCache(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	h, err := host.New(ctx, host.Options{CacheDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close(ctx)
	mod := abiModule().encode()
	if err := h.Precompile(ctx, mod); err != nil {
		t.Fatal(err)
	}
	if err := h.Precompile(ctx, []byte("not wasm")); !errors.Is(err, host.ErrRefused) {
		t.Fatalf("precompile garbage: %v", err)
	}
	n := 0
	filepathWalk(t, dir, func() { n++ })
	if n == 0 {
		t.Fatal("precompile left nothing in the cache directory")
	}
}
