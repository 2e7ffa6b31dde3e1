package host_test

// Benchmarks of issue 4's performance targets (results in BENCHMARKS.md):
//
//	go test ./models/host -run '^$' -bench . -count 6
//
// host overhead per inference (BenchmarkInfer), activation of a small
// module with a warm compilation cache (BenchmarkActivation), and resident
// memory per loaded model (BenchmarkResidentMemory).

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// identityModule hand-assembles a model whose inference costs next to
// nothing, so that timing it times the host: ef_infer copies the input
// frame to the output buffer and renames its one tensor from "x" to "y"
// (both are one byte, at offset 10 of the frame). ef_alloc is a bump
// allocator keeping its next free address at address 0. filler adds that
// many functions of about 1 KB of integer arithmetic, compiled but never
// called, so that the module has the size and shape of a small compiled
// model (the model compiler emits a few large functions).
func identityModule(name string, filler int) []byte {
	meta := []byte(`{"name":"` + name + `","version":"1.0.0","inputs":[{"name":"x","datatype":"FP32","shape":[-1]}],"outputs":[{"name":"y","datatype":"FP32","shape":[-1]}]}`)
	const metaAt, heapAt = 16, 1024
	load0 := []byte{0x28, 0x02, 0x00}  // i32.load align=4 offset=0
	store0 := []byte{0x36, 0x02, 0x00} // i32.store align=4 offset=0
	add, sub, mul, xor := []byte{0x6a}, []byte{0x6b}, []byte{0x6c}, []byte{0x73}
	funcs := []wfunc{
		{export: "ef_abi_version", results: []byte{i32}, body: constI32(1)},
		// [0] = [0] + size; return [0] - size
		{export: "ef_alloc", params: []byte{i32}, results: []byte{i32}, body: cat(
			constI32(0), constI32(0), load0, localGet(0), add, store0,
			constI32(0), load0, localGet(0), sub)},
		// copy in to out, out[10] = 'y', return in_len (or -2 if it does not fit)
		{export: "ef_infer", params: []byte{i32, i32, i32, i32}, results: []byte{i32}, body: cat(
			localGet(1), localGet(3), []byte{0x4b}, // in_len > out_cap (unsigned)
			[]byte{0x04, 0x40}, constI32(-2), []byte{0x0f, 0x0b}, // if: return -2
			localGet(2), localGet(0), localGet(1), memoryCopy,
			localGet(2), constI32('y'), []byte{0x3a, 0x00, 0x0a}, // i32.store8 offset=10
			localGet(1))},
		{export: "ef_last_error", params: []byte{i32, i32}, results: []byte{i32}, body: constI32(0)},
		{export: "ef_metadata", params: []byte{i32, i32}, results: []byte{i32},
			body: cat(localGet(0), constI32(metaAt), constI32(int32(len(meta))), memoryCopy, constI32(int32(len(meta))))},
	}
	for k := 0; k < filler; k++ {
		var body []byte
		body = append(body, localGet(0)...)
		for j := int32(1); j <= 100; j++ {
			body = cat(body, constI32(int32(k)*31+j), mul, constI32(j*977), xor, constI32(j), add)
		}
		funcs = append(funcs, wfunc{params: []byte{i32}, results: []byte{i32}, body: body})
	}
	heap := binary.LittleEndian.AppendUint32(nil, heapAt)
	return wmodule{funcs: funcs, pages: 4, data: []wdata{{0, heap}, {metaAt, meta}}}.encode()
}

// smallFiller makes identityModule a small module: about 36 KB.
const smallFiller = 36

// identityBundle packs identityModule with one golden vector.
func identityBundle(tb testing.TB, name string, filler int) *bundle.Bundle {
	tb.Helper()
	return modeltest.Bundle(tb, bundle.Manifest{
		ABI: 1, Name: name, Version: "1.0.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
		Limits:  bundle.Limits{MemoryPages: 16, TimeoutMillis: 1000},
		Tests: []bundle.TestVector{{
			Inputs:  []bundle.TensorValue{{Name: "x", Datatype: "FP32", Shape: []int64{3}, Data: []float64{1, -2, 0.5}}},
			Outputs: []bundle.TensorValue{{Name: "y", Datatype: "FP32", Shape: []int64{3}, Data: []float64{1, -2, 0.5}}},
		}},
	}, identityModule(name, filler))
}

// nativeIdentity is the identity guest's work done by a Go call: the
// baseline that BenchmarkInfer's host figures are compared with.
//
//go:noinline
func nativeIdentity(in []tensor.Tensor) []tensor.Tensor {
	out := make([]tensor.Tensor, len(in))
	for i, t := range in {
		t.Name = "y"
		t.Data = append([]byte(nil), t.Data...)
		out[i] = t
	}
	return out
}

// TestIdentityModule keeps the benchmarks honest: the trivial guest does
// load, pass its golden test and answer its input back renamed.
func TestIdentityModule(t *testing.T) {
	t.Parallel()
	h := newHost(t, host.Options{})
	m := load(t, h, identityBundle(t, "identity", smallFiller))
	in := []tensor.Tensor{tensor.FromFloat32("x", []int64{4}, []float32{1, 2, 3, 4})}
	out, err := m.Infer(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	native := nativeIdentity(in)
	y, _ := out[0].Float32s()
	if out[0].Name != native[0].Name || fmt.Sprint(y) != "[1 2 3 4]" {
		t.Fatalf("identity guest answered %+v", out)
	}
	if n := len(identityModule("identity", smallFiller)); n < 20<<10 || n > 60<<10 {
		t.Fatalf("the small module is %d bytes, want tens of KB", n)
	}
}

// BenchmarkInfer: the time of one inference of a small input through the
// host (pool, frame encoding, bounds checks, deadline, decode) with a guest
// whose own work is a copy, against the same work as a native Go call.
func BenchmarkInfer(b *testing.B) {
	ctx := context.Background()
	in := []tensor.Tensor{tensor.FromFloat32("x", []int64{4}, []float32{1, 2, 3, 4})}
	b.Run("native", func(b *testing.B) {
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if out := nativeIdentity(in); len(out) != 1 {
				b.Fatal(out)
			}
		}
	})
	h := modeltest.NewHost(b, host.Options{Logger: discardLogger()})
	m, err := h.Load(ctx, identityBundle(b, "identity", 0))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("host", func(b *testing.B) {
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if _, err := m.Infer(ctx, in); err != nil {
				b.Fatal(err)
			}
		}
	})
	// An HTTP handler's context can be canceled, which costs the
	// watchdog a context.AfterFunc per call.
	b.Run("host-cancelable-ctx", func(b *testing.B) {
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if _, err := m.Infer(cctx, in); err != nil {
				b.Fatal(err)
			}
		}
	})
	// Interleaved: rounds of native calls then host calls, each round
	// timed, medians over the rounds. Both sides see the same machine
	// (the load of other work changes from second to second), so the
	// difference of the medians is the host's overhead, even on a busy
	// machine. ns/op here is per round.
	b.Run("interleaved", func(b *testing.B) {
		const calls = 200
		var native, hosted []float64
		for b.Loop() {
			start := time.Now()
			for i := 0; i < calls; i++ {
				if out := nativeIdentity(in); len(out) != 1 {
					b.Fatal(out)
				}
			}
			mid := time.Now()
			for i := 0; i < calls; i++ {
				if _, err := m.Infer(ctx, in); err != nil {
					b.Fatal(err)
				}
			}
			native = append(native, float64(mid.Sub(start))/calls)
			hosted = append(hosted, float64(time.Since(mid))/calls)
		}
		n, h := medianOf(native), medianOf(hosted)
		b.ReportMetric(n, "native-ns/call")
		b.ReportMetric(h, "host-ns/call")
		b.ReportMetric(h-n, "overhead-ns/call")
	})
	g, err := h.Load(ctx, modeltest.ExampleBundle(b, "grid-anomaly", "1.0.0"))
	if err != nil {
		b.Fatal(err)
	}
	one := []tensor.Tensor{readings(rows[0])}
	b.Run("go-guest-grid-anomaly-1-row", func(b *testing.B) {
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if _, err := g.Infer(ctx, one); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkActivation: verify (decode and digest) + compile (a warm disk
// cache: the agent precompiles at download) + instantiate + metadata and
// ABI checks + golden self-test, then Close.
func BenchmarkActivation(b *testing.B) {
	ctx := context.Background()
	cases := []struct {
		name string
		b    func() *bundle.Bundle
	}{
		{"small-module", func() *bundle.Bundle { return identityBundle(b, "identity", smallFiller) }},
		{"tiny-module", func() *bundle.Bundle { return identityBundle(b, "identity", 0) }},
		{"go-guest-grid-anomaly", func() *bundle.Bundle { return modeltest.ExampleBundle(b, "grid-anomaly", "1.0.0") }},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			bd := c.b()
			data, err := bd.Encode()
			if err != nil {
				b.Fatal(err)
			}
			h, err := host.New(ctx, host.Options{CacheDir: b.TempDir(), PoolSize: 1})
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close(ctx)
			if err := h.Precompile(ctx, bd.Module); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(len(bd.Module)), "module-bytes")
			for b.Loop() {
				dec, err := bundle.Decode(data)
				if err != nil {
					b.Fatal(err)
				}
				m, err := h.Load(ctx, dec)
				if err != nil {
					b.Fatal(err)
				}
				if err := m.Close(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkResidentMemory loads models and reports the process's resident
// memory (from /proc/self/statm) it added per model, each model ready to
// answer (loaded, self-tested, one idle instance). The small modules are
// all distinct, so each brings its own machine code; the Go guest is one
// module loaded several times (its machine code, shared through the
// compilation cache, is counted once in the total). The standby case
// releases each model's instances after loading it, as the agent keeps
// the previous version for a rollback.
func BenchmarkResidentMemory(b *testing.B) {
	if _, err := os.Stat("/proc/self/statm"); err != nil {
		b.Skip("needs /proc/self/statm")
	}
	ctx := context.Background()
	cases := []struct {
		name   string
		models int
		bundle func(i int) *bundle.Bundle
		// standby: after loading, ReleaseIdle(0), as the agent does with
		// the previous version it keeps for an instant rollback.
		standby bool
	}{
		{"small-module", 50, func(i int) *bundle.Bundle { return identityBundle(b, fmt.Sprintf("identity-%d", i), smallFiller) }, false},
		{"go-guest-grid-anomaly", 8, func(int) *bundle.Bundle { return modeltest.ExampleBundle(b, "grid-anomaly", "1.0.0") }, false},
		{"go-guest-grid-anomaly-standby", 8, func(int) *bundle.Bundle { return modeltest.ExampleBundle(b, "grid-anomaly", "1.0.0") }, true},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			bundles := make([]*bundle.Bundle, c.models)
			for i := range bundles {
				bundles[i] = c.bundle(i)
			}
			var perModel float64
			for b.Loop() {
				h, err := host.New(ctx, host.Options{CacheDir: b.TempDir()})
				if err != nil {
					b.Fatal(err)
				}
				for _, bd := range bundles[:1] {
					if err := h.Precompile(ctx, bd.Module); err != nil {
						b.Fatal(err)
					}
				}
				before := residentBytes(b)
				models := make([]*host.Model, len(bundles))
				for i, bd := range bundles {
					if models[i], err = h.Load(ctx, bd); err != nil {
						b.Fatal(err)
					}
					if c.standby {
						models[i].ReleaseIdle(ctx, 0)
					}
				}
				after := residentBytes(b)
				perModel = float64(after-before) / float64(len(models))
				for _, m := range models {
					m.Close(ctx)
				}
				h.Close(ctx)
			}
			b.ReportMetric(perModel, "rss-bytes/model")
		})
	}
}

func medianOf(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// cpuPerOp starts measuring the CPU time the whole process spends (every
// thread: the guest, wazero's watcher goroutine, timers, the collector);
// the function it returns reports it per operation as cpu-ns/op. On a
// machine shared with other work, wall-clock ns/op grows with the load
// while the CPU time an inference costs does not.
func cpuPerOp(b *testing.B) func() {
	start := cpuTime(b)
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
		}
	}
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// residentBytes is the process's resident set after a full collection, so
// garbage does not count.
func residentBytes(tb testing.TB) int64 {
	tb.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	data, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		tb.Fatal(err)
	}
	fields := strings.Fields(string(data))
	pages, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil {
		tb.Fatal(err)
	}
	return pages * int64(os.Getpagesize())
}

// discardLogger drops every line: logging to the test log would time the
// log, not the host.
func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
