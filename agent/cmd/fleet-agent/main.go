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
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/edgefleet/edgefleet/agent"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := doMain(ctx, os.Args[1:], os.Getenv, os.Stderr)
	stop()
	os.Exit(code)
}

// doMain runs the agent with args and the environment getenv, logging to
// stderr, and returns the process exit code: 0 after a clean stop, 1 when
// the agent failed, 2 for bad configuration.
func doMain(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) int {
	for _, a := range args {
		if a == "--version" || a == "-version" {
			fmt.Fprintln(stderr, "fleet-agent", agent.Version)
			return 0
		}
	}
	cfg, err := agent.LoadConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "fleet-agent: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.SlogLevel()}))
	if err := agent.Run(ctx, cfg, agent.Options{Logger: log}); err != nil {
		log.Error("agent failed", "err", err)
		return 1
	}
	return 0
}
