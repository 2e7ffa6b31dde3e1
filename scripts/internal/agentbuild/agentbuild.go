// Package agentbuild is the one place that says how fleet-agent is built:
// `make build` (through scripts/agentbuild), scripts/bench and the
// end-to-end tests all build it with Command, so the binary that is
// benchmarked and tested is the one that ships.
// RATIONALE.md ("The agent's build flags") says why the flags are these
// and not the smaller, slower ones that were measured.
package agentbuild

import (
	"context"
	"os"
	"os/exec"
	"strings"
)

// Package is the agent's main package.
const Package = "github.com/edgefleet/edgefleet/agent/cmd/fleet-agent"

// Tags are the build tags. nethttpomithttp2 leaves net/http's bundled
// HTTP/2 out: the agent serves its local endpoint over HTTP/1.1 and
// downloads from the controller over HTTP/1.1 (HTTPS included), and MQTT
// over WebSockets is HTTP/1.1 by definition.
var Tags = []string{"nethttpomithttp2"}

// Strip drops the symbol table and DWARF: the shipped binary has neither.
// Options.Symbols leaves it out, for a build that nm can read.
const Strip = "-s -w"

// Options vary a build without changing what is compiled.
type Options struct {
	// X are linker -X definitions (importpath.name=value), such as
	// github.com/edgefleet/edgefleet/agent.Version=1.2.3.
	X []string
	// Symbols keeps the symbol table (no Strip), so that `go tool nm` can
	// say where the bytes go; the code is the same as the shipped one's.
	Symbols bool
}

// Args are the `go build` arguments after "build", for output out (a
// file, or a directory ending in "/").
func Args(out string, o Options) []string {
	var ld []string
	if !o.Symbols {
		ld = append(ld, Strip)
	}
	for _, x := range o.X {
		ld = append(ld, "-X "+x)
	}
	return []string{"-trimpath", "-tags=" + strings.Join(Tags, ","), "-ldflags=" + strings.Join(ld, " "), "-o", out, Package}
}

// Command returns `go build` of fleet-agent to out, run in dir (the
// module root, or "" for the current directory), static (CGO_ENABLED=0).
func Command(ctx context.Context, dir, out string, o Options) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "go", append([]string{"build"}, Args(out, o)...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	return cmd
}
