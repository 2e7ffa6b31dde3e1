package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/agent/update"
)

// testBehavior is a TEST-ONLY switch, set at build time with
// -ldflags "-X main.testBehavior=exit" (or noconnect), to make the broken
// agent releases the self-update tests roll out: "exit" exits with status 3
// right after its configuration is read, "noconnect" runs but never
// reaches the broker. Release builds leave it empty.
var testBehavior string

// superviseMain runs `fleet-agent supervise [flags] -- AGENT FLAGS`: the
// watchdog of self-updates (agent/update.Supervise), running this same
// binary as the agent.
func superviseMain(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) int {
	fs := flag.NewFlagSet("fleet-agent supervise", flag.ContinueOnError)
	fs.SetOutput(stderr)
	maxStarts := fs.Int("max-starts", 3, "starts a new agent release gets before the previous binary is restored")
	maxExits := fs.Int("max-exits", 3, "exits a new release may have in its probation after reporting healthy")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: fleet-agent supervise [--max-starts N] [--max-exits N] -- [agent flags]")
		fmt.Fprintln(stderr, "Runs the agent as a child and restores the previous binary when a new release")
		fmt.Fprintln(stderr, "exits, crash-loops or does not connect and report within --update-deadline.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	agentArgs := fs.Args()
	// The agent's own configuration says where its data (the update
	// record) is; it is checked here too, so a typo fails now, not in a
	// restart loop.
	cfg, err := agent.LoadConfig(agentArgs, getenv, io.Discard)
	if err != nil {
		fmt.Fprintf(stderr, "fleet-agent supervise: agent flags: %v\n", err)
		return 2
	}
	exe, err := executable()
	if err != nil {
		fmt.Fprintf(stderr, "fleet-agent supervise: %v\n", err)
		return 1
	}
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(*logLevel))
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	err = update.Supervise(ctx, update.SuperviseOptions{
		Exe: exe, Args: agentArgs, DataDir: cfg.Data, MaxStarts: *maxStarts, MaxExits: *maxExits,
		Stdout: os.Stdout, Stderr: stderr, Logger: log,
	})
	if err != nil {
		log.Error("supervisor failed", "err", err)
		return 1
	}
	return 0
}

// executable is the agent binary's path with symbolic links resolved: the
// file a self-update replaces.
func executable() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("cannot find this binary's path: %w", err)
	}
	return filepath.EvalSymlinks(exe)
}
