// Package cli implements the fleet command: one function per verb, each
// parsing its own flags (the global ones included, so they may stand before
// or after the verb) and calling the controller through fleet/client.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// env is the process environment, swapped in tests.
var env = os.Getenv

// globals are the flags every verb accepts.
type globals struct {
	controller string
	token      string
	output     string
}

func (g *globals) register(fs *flag.FlagSet) {
	def := env("EDGEFLEET_CONTROLLER")
	if def == "" {
		def = client.DefaultURL
	}
	fs.StringVar(&g.controller, "controller", def, "controller URL (env EDGEFLEET_CONTROLLER)")
	fs.StringVar(&g.token, "token", env("EDGEFLEET_TOKEN"), "API token (env EDGEFLEET_TOKEN)")
	fs.StringVar(&g.output, "o", "table", "output format: table, json or yaml")
}

func (g *globals) client() (*client.Client, error) {
	switch g.output {
	case "table", "json", "yaml":
	default:
		return nil, fmt.Errorf("-o %q: choose table, json or yaml", g.output)
	}
	return client.New(g.controller, g.token)
}

// cmd is one verb.
type cmd struct {
	name, args, help string
	run              func(ctx context.Context, e *exec, args []string) error
}

// exec carries what a verb needs to run.
type exec struct {
	stdout, stderr io.Writer
}

var commands []cmd

func init() {
	commands = []cmd{
		{"devices", "[-l SELECTOR]", "list devices, optionally those matching a label selector", runDevices},
		{"device", "ID", "show one device: what it runs, since when, online, health, buffer, last events", runDevice},
		{"model", "build|check|predict|sign|push|list ...", "build, check, try, sign and upload model bundles; list uploaded models", runModel},
		{"telemetry", telemetryUsage, "inference counts, errors, latency p50/p95/p99 and drift per model version, device or rollout wave", runTelemetry},
		{"assign", "MODEL@VERSION -l SELECTOR [--slot SLOT]", "put a model version on every device the selector matches", runAssign},
		{"rollout", rolloutUsage, "staged rollouts: create, list, get, watch live, pause, resume, approve, abort, rollback", runRollout},
		{"agent", agentUsage, "sign and upload agent releases (roll them out with rollout create --agent-release)", runAgent},
		{"sim", simUsage, "run N simulated devices (real agent code) against the controller", runSim},
		{"keys", keysUsage, "release key pair; list, rotate (announced to agents) and push key announcements", runKeys},
		{"certs", "init|device ID|broker [--dir DIR]", "create the fleet CA, the controller's and devices' TLS certificates", runCerts},
		{"token", "create --name N --role R | list | revoke NAME", "manage API tokens (needs an admin token)", runToken},
		{"audit", "[--who NAME] [--limit N]", "show the audit log of changes, newest first", runAudit},
	}
}

// Main runs the CLI and returns the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	e := &exec{stdout: stdout, stderr: stderr}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			err := c.run(ctx, e, args[1:])
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, errUsage):
				fmt.Fprintf(stderr, "fleet %s: %v\nusage: fleet %s %s\n", c.name, err, c.name, c.args)
				return 2
			default:
				fmt.Fprintf(stderr, "fleet %s: %v\n", c.name, err)
				return 1
			}
		}
	}
	fmt.Fprintf(stderr, "fleet: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

var errUsage = errors.New("usage")

func usageErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "fleet: operate an Edgefleet fleet through its controller")
	fmt.Fprintln(w, "\nusage: fleet COMMAND [flags]")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-8s %-42s %s\n", c.name, c.args, c.help)
	}
	fmt.Fprintln(w, "\nflags of every command: --controller URL (EDGEFLEET_CONTROLLER), --token T (EDGEFLEET_TOKEN), -o table|json|yaml")
}

// newFlags returns a flag set for verb with the global flags registered.
func newFlags(e *exec, verb string, g *globals) *flag.FlagSet {
	fs := flag.NewFlagSet("fleet "+verb, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	g.register(fs)
	return fs
}

// parse parses flags that may be mixed with positional arguments
// (`fleet device dev-1 -o json`) and returns the positional ones.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func formatLabels(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + l[k]
	}
	return strings.Join(parts, ",")
}
