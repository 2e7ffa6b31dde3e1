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
// metadata, run the 8 golden vectors (host.Load); and the compile step
// alone. It reports wall time (ns/op) and CPU time (cpu-ns/op).
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
	run := func(b *testing.B, f func()) {
		c0 := cpuTime()
		for b.Loop() {
			f()
		}
		b.ReportMetric(float64(cpuTime()-c0)/float64(b.N), "cpu-ns/op")
	}
	b.Run("host.Load", func(b *testing.B) {
		run(b, func() {
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
	b.Run("compile", func(b *testing.B) {
		run(b, func() {
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
