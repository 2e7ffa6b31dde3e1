// Command agentbuild builds fleet-agent with the flags of
// scripts/internal/agentbuild, for `make build`:
//
//	go run ./scripts/agentbuild -o bin/fleet-agent -X github.com/edgefleet/edgefleet/agent.Version=1.2.3
//
// -print writes the `go build` arguments instead, one per line.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/edgefleet/edgefleet/scripts/internal/agentbuild"
)

func main() {
	os.Exit(doMain(os.Args[1:]))
}

func doMain(args []string) int {
	fs := flag.NewFlagSet("agentbuild", flag.ContinueOnError)
	out := fs.String("o", "bin/fleet-agent", "output `file`")
	printArgs := fs.Bool("print", false, "print the go build arguments, one per line, and build nothing")
	var xs []string
	fs.Func("X", "linker -X `importpath.name=value`, repeatable", func(s string) error {
		xs = append(xs, s)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *printArgs {
		for _, a := range agentbuild.Args(*out, agentbuild.Options{X: xs}) {
			fmt.Println(a)
		}
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	cmd := agentbuild.Command(ctx, "", *out, agentbuild.Options{X: xs})
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "agentbuild: go build %s: %v\n", agentbuild.Package, err)
		return 1
	}
	return 0
}
