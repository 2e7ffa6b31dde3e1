package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/edgefleet/edgefleet/agent"
)

// precompileMain runs `fleet-agent precompile --data DIR DIGEST...`: it
// compiles the stored bundles named by their digests into the agent's
// compilation cache with this binary's wazero. A running agent has the
// release it is about to become run it before the swap
// (update.RunPrecompile), so the restart restores its models from a warm
// cache instead of compiling them while the local endpoint waits.
func precompileMain(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("fleet-agent precompile", flag.ContinueOnError)
	fs.SetOutput(stderr)
	data := fs.String("data", "", "the agent's data `directory` (bundles and compilation cache)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: fleet-agent precompile --data DIR DIGEST...")
		fmt.Fprintln(stderr, "Compiles stored model bundles into the agent's compilation cache; a self-update runs it.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if *data == "" || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if err := agent.PrecompileStored(ctx, *data, fs.Args()); err != nil {
		fmt.Fprintf(stderr, "fleet-agent precompile: %v\n", err)
		return 1
	}
	return 0
}
