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
	"runtime/pprof"
	"syscall"

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
// profile; so the benchmark profiles just the part it measures.
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
