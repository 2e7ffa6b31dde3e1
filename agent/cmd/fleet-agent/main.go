// Command fleet-agent is the Edgefleet edge agent daemon. It keeps a
// device's models converged to what the controller wants, serves them on a
// local Open Inference Protocol endpoint, and reports back over MQTT.
//
//	fleet-agent --id pos-17 --label region=eu --broker tcp://ctl:1883 --controller http://ctl:8080
//
// With a TLS broker the device presents its certificate (`fleet certs
// device ID`), whose name must be its id:
//
//	fleet-agent --id pos-17 --broker ssl://ctl:8883 --tls-cert pos-17.crt --tls-key pos-17.key --tls-ca ca.crt
//
// Flags win over EDGEFLEET_* environment variables, which win over the
// --config YAML file. SIGINT or SIGTERM stops it cleanly.
//
// Run as a service, it runs under its own watchdog, which restores the
// previous binary when an agent release does not prove itself (see
// agent/README.md and scripts/systemd/fleet-agent.service):
//
//	fleet-agent supervise -- --id pos-17 --broker ssl://ctl:8883 ...
//
// `fleet-agent precompile --data DIR DIGEST...` compiles stored bundles
// into the agent's compilation cache; a self-update runs it with the new
// binary before the swap (precompile.go).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/agent/update"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := doMain(ctx, os.Args[1:], os.Getenv, os.Stderr)
	stop()
	os.Exit(code)
}

// reexec replaces the process; a variable so tests can see the call.
var reexec = update.Exec

// doMain runs the agent with args and the environment getenv, logging to
// stderr, and returns the process exit code: 0 after a clean stop, 1 when
// the agent failed, 2 for bad configuration.
func doMain(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "supervise" {
		return superviseMain(ctx, args[1:], getenv, stderr)
	}
	if len(args) > 0 && args[0] == "precompile" {
		return precompileMain(ctx, args[1:], stderr)
	}
	for _, a := range args {
		if a == "--version" || a == "-version" {
			fmt.Fprintln(stderr, "fleet-agent", agent.Version)
			return 0
		}
	}
	// A self-update's restart is timed across the exec (update.Trace).
	trace := update.InheritTrace()
	if trace == nil {
		trace = update.NewTrace()
		trace.Mark(update.StepStarted)
	}
	cfg, err := agent.LoadConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "fleet-agent: %v\n", err)
		return 2
	}
	if err := update.DieWithSupervisor(); err != nil {
		fmt.Fprintf(stderr, "fleet-agent: %v; exiting\n", err)
		return 1
	}
	switch testBehavior {
	case "exit":
		fmt.Fprintln(stderr, "fleet-agent: TEST BUILD (testBehavior=exit): exiting at start")
		return 3
	case "noconnect":
		fmt.Fprintln(stderr, "fleet-agent: TEST BUILD (testBehavior=noconnect): never connecting")
		cfg.Broker = "tcp://127.0.0.1:9"
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.SlogLevel()}))
	exe, err := executable()
	if err != nil {
		log.Warn("self-update off", "err", err)
	}
	// The local endpoint's socket is made here, or inherited from the
	// process this one replaced, so it can outlive a self-update's exec.
	// If that fails, the agent tries again itself, after its other checks,
	// and reports it.
	// This process is one agent, so the process-wide memory settings are
	// its own to make.
	if cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(int64(min(cfg.MemoryLimit, math.MaxInt64)))
	}
	opts := agent.Options{Logger: log, Executable: exe, RestartTrace: trace, TrimIdle: cfg.TrimAfter}
	ln, dup, lerr := update.Listen(cfg.Listen)
	if lerr == nil {
		opts.Listener = ln
	}
	trace.Mark(update.StepConfigured)
	err = agent.Run(ctx, cfg, opts)
	if lerr == nil && !errors.Is(err, agent.ErrRestart) {
		ln.Close() // closed already unless the agent stopped before serving
		if dup != nil {
			dup.Close()
		}
	}
	if errors.Is(err, agent.ErrRestart) {
		// The new binary is in place and the agent stopped cleanly: become
		// it, handing over the listening socket.
		trace.Mark(update.StepClosed)
		log.Info("re-executing the new agent binary", "exe", exe)
		if perr := update.PassListener(dup); perr != nil {
			log.Warn("the new binary opens its own socket", "err", perr)
		}
		trace.Mark(update.StepExec)
		if terr := trace.Pass(); terr != nil {
			log.Debug("the restart is not timed", "err", terr)
		}
		err = reexec(exe, append([]string{os.Args[0]}, args...))
		log.Error("cannot execute the new agent binary; exiting so the watchdog restores the previous one", "err", err)
		return 1
	}
	if err != nil {
		if errors.Is(err, agent.ErrNoKeys) {
			// Configuration, not a failure: say it plainly, without a log line.
			fmt.Fprintf(stderr, "fleet-agent: %v\n", err)
			return 2
		}
		log.Error("agent failed", "err", err)
		return 1
	}
	return 0
}
