// Command fleet-controller runs the Edgefleet control plane: an embedded
// MQTT broker (or a link to an external one), the device inventory,
// telemetry ingest, desired-state publishing and the HTTP API.
//
//	fleet-controller [--data DIR] [--mqtt-listen ADDR | --broker URL]
//	                 [--http-listen ADDR] [--public-url URL] [--log-level LEVEL]
//	                 [--mqtt-tls-cert FILE --mqtt-tls-key FILE --mqtt-client-ca FILE]
//
// With the --mqtt-tls-* flags the embedded broker speaks TLS only and
// admits clients with a certificate of the fleet CA, each confined to its
// own topics (see SECURITY.md); with an ssl:// --broker they are the
// controller's client certificate and the broker's CA. On first start the
// controller writes an admin API token to DATA/admin.token.
//
// Every flag also reads EDGEFLEET_<NAME> (EDGEFLEET_DATA,
// EDGEFLEET_MQTT_LISTEN, ...); a flag given on the command line wins.
// SIGINT or SIGTERM shuts the controller down cleanly.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/edgefleet/edgefleet/controller"
)

func main() {
	os.Exit(doMain(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// doMain is main without the process: it returns the exit code.
func doMain(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cfg := controller.DefaultConfig()
	cfg.ApplyEnv(getenv)
	fs := flag.NewFlagSet("fleet-controller", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "fleet-controller: unexpected argument %q; all settings are flags (see --help)\n", fs.Arg(0))
		return 2
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "fleet-controller: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := controller.RunWith(ctx, cfg, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "fleet-controller: %v\n", err)
		return 1
	}
	return 0
}
