package compiler_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/tetratelabs/wazero"

	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/host"
)

// cpuTime is the CPU time (user + system) this process has used: on a
// machine shared with other work it measures the cost of what ran, where
// the wall clock also measures the wait for a core.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkActivation measures what an agent pays to activate the
// breast-cancer bundle with nothing cached: a new host (so a new
// compilation cache), compile the module, instantiate it, check ABI and
// metadata, run the 8 golden vectors (host.Load); the same with the module
// precompiled into the on-disk cache, as the agent has it since it
// precompiles right after the download; Precompile itself; and the compile
// step alone. It reports wall time (ns/op) and CPU time (cpu-ns/op), both
// without the untimed setup of each iteration.
func BenchmarkActivation(b *testing.B) {
	spec, err := compiler.ReadSpec("../examples/breast-cancer-risk")
	if err != nil {
		b.Fatal(err)
	}
	res, err := spec.Build()
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	// run times f; f runs setup through untimed, which stops both clocks.
	run := func(b *testing.B, f func(untimed func(func()))) {
		var excluded time.Duration
		untimed := func(setup func()) {
			b.StopTimer()
			c := cpuTime()
			setup()
			excluded += cpuTime() - c
			b.StartTimer()
		}
		c0 := cpuTime()
		for b.Loop() {
			f(untimed)
		}
		b.ReportMetric(float64(cpuTime()-c0-excluded)/float64(b.N), "cpu-ns/op")
	}
	b.Run("host.Load", func(b *testing.B) {
		run(b, func(untimed func(func())) {
			h, err := host.New(ctx, host.Options{PoolSize: 1})
			if err != nil {
				b.Fatal(err)
			}
			m, err := h.Load(ctx, res.Bundle)
			if err != nil {
				b.Fatal(err)
			}
			m.Close(ctx)
			h.Close(ctx)
		})
	})
	// The module is in the on-disk compilation cache, so Load reads
	// machine code instead of compiling. A new host each time (made
	// untimed), so nothing is reused from memory.
	b.Run("host.Load-precompiled", func(b *testing.B) {
		dir := b.TempDir()
		h, err := host.New(ctx, host.Options{PoolSize: 1, CacheDir: dir})
		if err != nil {
			b.Fatal(err)
		}
		if err := h.Precompile(ctx, res.Bundle.Module); err != nil {
			b.Fatal(err)
		}
		h.Close(ctx)
		run(b, func(untimed func(func())) {
			var h *host.Host
			untimed(func() {
				if h, err = host.New(ctx, host.Options{PoolSize: 1, CacheDir: dir}); err != nil {
					b.Fatal(err)
				}
			})
			m, err := h.Load(ctx, res.Bundle)
			if err != nil {
				b.Fatal(err)
			}
			untimed(func() {
				m.Close(ctx)
				h.Close(ctx)
			})
		})
	})
	// Precompile itself, into a fresh on-disk cache each time: the cost
	// moved off the activation path, paid once per download.
	b.Run("precompile", func(b *testing.B) {
		run(b, func(untimed func(func())) {
			var h *host.Host
			untimed(func() {
				if h, err = host.New(ctx, host.Options{PoolSize: 1, CacheDir: b.TempDir()}); err != nil {
					b.Fatal(err)
				}
			})
			if err := h.Precompile(ctx, res.Bundle.Module); err != nil {
				b.Fatal(err)
			}
			untimed(func() { h.Close(ctx) })
		})
	})
	b.Run("compile", func(b *testing.B) {
		run(b, func(func(func())) {
			// The host's configuration: deadlines stop a guest.
			rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfig().WithCloseOnContextDone(true))
			c, err := rt.CompileModule(ctx, res.Bundle.Module)
			if err != nil {
				b.Fatal(err)
			}
			c.Close(ctx)
			rt.Close(ctx)
		})
	})
}
