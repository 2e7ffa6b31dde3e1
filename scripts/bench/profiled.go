package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edgefleet/edgefleet/controller"
)

// profiledControllerCmd is the first argument that makes this binary run
// the controller instead of the benchmarks: the same code as
// fleet-controller (controller.RunWith), under runtime/pprof, since the
// controller serves no profiling endpoint:
//
//	bench controller-profiled --cpuprofile F --memprofile F -- [fleet-controller flags]
//
// SIGUSR1 starts the CPU profile; SIGUSR2 stops it and writes the heap
// profile; so the benchmark profiles just the part it measures. With
// --memprofile it also samples the Go runtime's memory classes from the
// start and writes, beside the heap profile (F.peak), their values at the
// moment the process used the most: a heap profile shows only live
// objects after a GC, not goroutine stacks nor the garbage between GCs
// that make up a peak's resident memory.
const profiledControllerCmd = "controller-profiled"

func runProfiledController(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet(profiledControllerCmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	cpuPath := fs.String("cpuprofile", "", "CPU profile `file`")
	memPath := fs.String("memprofile", "", "heap profile `file`")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg := controller.DefaultConfig()
	cfs := flag.NewFlagSet("fleet-controller", flag.ContinueOnError)
	cfs.SetOutput(stderr)
	cfg.RegisterFlags(cfs)
	if err := cfs.Parse(fs.Args()); err != nil {
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	var cpu *os.File
	peaks := newMemPeaks()
	if *memPath != "" {
		go peaks.sample(ctx)
	}
	go func() {
		for s := range sigs {
			switch {
			case s == syscall.SIGUSR1 && cpu == nil && *cpuPath != "":
				f, err := os.Create(*cpuPath)
				if err == nil {
					err = pprof.StartCPUProfile(f)
				}
				if err != nil {
					fmt.Fprintln(stderr, "cpu profile:", err)
					continue
				}
				cpu = f
			case s == syscall.SIGUSR2:
				if cpu != nil {
					pprof.StopCPUProfile()
					cpu.Close()
					cpu = nil
				}
				if err := writeHeap(*memPath); err != nil {
					fmt.Fprintln(stderr, "heap profile:", err)
				}
				if *memPath != "" {
					if err := os.WriteFile(*memPath+".peak", []byte(peaks.String()), 0o644); err != nil {
						fmt.Fprintln(stderr, "memory peaks:", err)
					}
				}
			}
		}
	}()
	if err := controller.RunWith(ctx, cfg, os.Stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "fleet-controller (profiled): %v\n", err)
		return 1
	}
	return 0
}

func writeHeap(path string) error {
	if path == "" {
		return errors.New("no --memprofile file")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// memClasses are the runtime/metrics samples memPeaks keeps: what the Go
// runtime holds from the OS, broken down.
var memClasses = []string{
	"/memory/classes/total:bytes",
	"/memory/classes/heap/released:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/unused:bytes",
	"/memory/classes/heap/free:bytes",
	"/memory/classes/heap/stacks:bytes",
	"/memory/classes/os-stacks:bytes",
	"/memory/classes/metadata/other:bytes",
	"/memory/classes/metadata/mspan/inuse:bytes",
	"/gc/heap/live:bytes",
	"/gc/heap/goal:bytes",
	"/gc/stack/starting-size:bytes",
	"/sched/goroutines:goroutines",
}

// memPeaks keeps the sample of memClasses taken when the runtime held the
// most memory from the OS (total minus released), and each class's own
// maximum.
type memPeaks struct {
	mu      sync.Mutex
	at      time.Time
	atPeak  []uint64
	maximum []uint64
}

func newMemPeaks() *memPeaks {
	return &memPeaks{atPeak: make([]uint64, len(memClasses)), maximum: make([]uint64, len(memClasses))}
}

func (m *memPeaks) sample(ctx context.Context) {
	samples := make([]metrics.Sample, len(memClasses))
	for i, name := range memClasses {
		samples[i].Name = name
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		metrics.Read(samples)
		v := make([]uint64, len(samples))
		for i, s := range samples {
			if s.Value.Kind() == metrics.KindUint64 {
				v[i] = s.Value.Uint64()
			}
		}
		m.mu.Lock()
		if v[0]-v[1] > m.atPeak[0]-m.atPeak[1] {
			m.atPeak, m.at = v, time.Now()
		}
		for i := range v {
			m.maximum[i] = max(m.maximum[i], v[i])
		}
		m.mu.Unlock()
	}
}

func (m *memPeaks) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "peak (total minus released) at %s\n%-45s %12s %12s\n", m.at.UTC().Format(time.RFC3339Nano), "class", "at peak MiB", "max MiB")
	for i, name := range memClasses {
		div := float64(1 << 20)
		if !strings.HasSuffix(name, ":bytes") {
			div = 1
		}
		fmt.Fprintf(&b, "%-45s %12.1f %12.1f\n", name, float64(m.atPeak[i])/div, float64(m.maximum[i])/div)
	}
	return b.String()
}
