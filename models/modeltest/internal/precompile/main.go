// Command precompile fills a wazero compilation cache directory with the
// machine code of the given modules, using models/host's configuration.
//
// modeltest runs it, built without -race, before tests built with -race
// load a model: wazero's compiler instrumented by the race detector takes
// ten times longer, while the cached code it would produce is the same.
//
//	go run ./models/modeltest/internal/precompile -cache DIR module.wasm...
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/edgefleet/edgefleet/models/host"
)

func main() {
	os.Exit(doMain(os.Args[1:], os.Stderr))
}

func doMain(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("precompile", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cache := fs.String("cache", "", "wazero compilation cache directory (required)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *cache == "" || fs.NArg() == 0 {
		fmt.Fprintln(stderr, "usage: precompile -cache DIR module.wasm...")
		return 2
	}
	ctx := context.Background()
	h, err := host.New(ctx, host.Options{CacheDir: *cache})
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer h.Close(ctx)
	for _, path := range fs.Args() {
		mod, err := os.ReadFile(path)
		if err == nil {
			err = h.Precompile(ctx, mod)
		}
		if err != nil {
			fmt.Fprintf(stderr, "precompile %s: %v\n", path, err)
			return 1
		}
	}
	return 0
}
