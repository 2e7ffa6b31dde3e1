// Command bench runs Edgefleet's end-to-end benchmarks and writes their
// tables into BENCHMARKS.md (`make bench`):
//
//   - a model rolled out to 10,000 simulated devices (fleet sim, real agent
//     code) through 4 waves with zero soak, on the controller's embedded
//     broker and on Mosquitto: wall time, controller CPU and peak memory,
//     MQTT message rate, wave decision latency; and, in the same runs, the
//     assignment path (one model assigned to all 10,000 at once);
//   - the controller's telemetry ingest rate against the broker's raw
//     QoS 1 delivery rate, measured in the same run on the same broker;
//   - the agent: stripped static binary size, idle resident memory with
//     one compiled model loaded, memory per simulated device;
//   - the Go benchmarks of every package (go test -bench).
//
// Every figure is the median of several runs (-runs). The machine, the
// date, the commit and the command are written with the tables. Where a
// target is missed, the report says by how much, and a profiled run of
// the controller (the same code, in this binary, with runtime/pprof) shows
// where the time and memory go.
//
//	go run ./scripts/bench [-out BENCHMARKS.md] [-runs 3] [-devices 10000] [-only agent,ingest,rollout,go]
//
// The section it writes is delimited by markers; the rest of BENCHMARKS.md
// is left as it is.
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
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == profiledControllerCmd {
		os.Exit(runProfiledController(os.Args[2:], os.Stderr))
	}
	os.Exit(doMain(os.Args[1:], os.Stdout, os.Stderr))
}

// config is what the flags set.
type config struct {
	out       string
	runs      int
	devices   int
	joinRate  int
	fallback  int
	only      map[string]bool
	goPkgs    string
	goCount   int
	mosquitto string
	brokers   []string
	keep      bool
	profile   bool
	root      string
}

// parts are the benchmarks -only picks from.
var parts = []string{"agent", "ingest", "rollout", "go"}

func doMain(args []string, stdout, stderr io.Writer) int {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.out, "out", "BENCHMARKS.md", "file to write the tables into (its bench section is replaced, the rest kept)")
	fs.IntVar(&c.runs, "runs", 3, "runs of each end-to-end benchmark; the tables show medians")
	fs.IntVar(&c.devices, "devices", 10_000, "simulated devices in the rollout benchmark")
	fs.IntVar(&c.joinRate, "join-rate", 300, "simulated devices that connect per second before the rollout")
	fs.IntVar(&c.fallback, "fallback-devices", 2000, "when no rollout run with -devices finishes, run it with this many devices too, to have figures (0: do not)")
	only := fs.String("only", strings.Join(parts, ","), "benchmarks to run: "+strings.Join(parts, ","))
	fs.StringVar(&c.goPkgs, "go-packages", "./...", "packages whose Go benchmarks run")
	fs.IntVar(&c.goCount, "go-count", 3, "runs of each Go benchmark (-count)")
	brokers := fs.String("brokers", "embedded,mosquitto", "brokers to run the ingest and rollout benchmarks against: embedded, mosquitto")
	fs.StringVar(&c.mosquitto, "mosquitto", "", "mosquitto binary (default: found in PATH or /usr/sbin; without it the Mosquitto runs are skipped and the report says so)")
	fs.BoolVar(&c.keep, "keep", false, "keep the working directory (logs, profiles) instead of removing it")
	fs.BoolVar(&c.profile, "profile", false, "also profile the controller when every target is met")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "bench: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	c.only = map[string]bool{}
	for _, p := range strings.Split(*only, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if !slices.Contains(parts, p) {
			fmt.Fprintf(stderr, "bench: -only %q: choose from %s\n", p, strings.Join(parts, ","))
			return 2
		}
		c.only[p] = true
	}
	for _, b := range strings.Split(*brokers, ",") {
		switch b = strings.TrimSpace(b); b {
		case "embedded", "mosquitto":
			c.brokers = append(c.brokers, b)
		case "":
		default:
			fmt.Fprintf(stderr, "bench: -brokers %q: choose embedded, mosquitto or both\n", b)
			return 2
		}
	}
	if c.runs < 1 || c.devices < 1 || c.goCount < 1 || c.joinRate < 1 {
		fmt.Fprintln(stderr, "bench: -runs, -devices, -join-rate and -go-count must be at least 1")
		return 2
	}
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	if c.root, err = findRoot(wd); err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	if !filepath.IsAbs(c.out) {
		c.out = filepath.Join(c.root, c.out)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(ctx, c, args, log); err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	fmt.Fprintf(stdout, "wrote %s\n", c.out)
	return 0
}

// findRoot returns the directory holding go.mod, from dir upwards.
func findRoot(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod above %s; run bench from the Edgefleet repository", dir)
		}
	}
}

// run runs the chosen benchmarks and writes the report.
func run(ctx context.Context, c config, args []string, log *slog.Logger) error {
	work, err := os.MkdirTemp("", "edgefleet-bench-")
	if err != nil {
		return err
	}
	if c.keep {
		log.Info("working directory kept", "dir", work)
	} else {
		defer os.RemoveAll(work)
	}
	e := &env{cfg: c, work: work, log: log}
	res := &results{
		Machine:   describeMachine(ctx, c.root),
		Command:   "go run ./scripts/bench " + strings.Join(args, " "),
		Started:   time.Now().UTC(),
		Runs:      c.runs,
		LoadStart: loadAverage(),
	}
	if os.Getenv("MAKELEVEL") != "" {
		res.Command = "make bench` (`" + res.Command
	}
	log.Info("building binaries")
	if err := e.build(ctx); err != nil {
		return err
	}
	if err := e.buildModels(); err != nil {
		return err
	}
	e.mosquitto = findMosquitto(c.mosquitto)
	if e.mosquitto == "" && slices.Contains(c.brokers, "mosquitto") && (c.only["ingest"] || c.only["rollout"]) {
		res.Notes = append(res.Notes, "Mosquitto was not found (apt-get install -y mosquitto): its runs were skipped.")
	}
	if c.only["agent"] {
		log.Info("benchmark: agent binary and idle memory")
		a, err := e.benchAgent(ctx)
		if err != nil {
			return fmt.Errorf("agent benchmark: %w", err)
		}
		res.Agent = a
	}
	if c.only["ingest"] {
		for _, kind := range e.brokers() {
			log.Info("benchmark: telemetry ingest against raw QoS 1 delivery", "broker", kind)
			r, err := e.benchIngest(ctx, kind)
			if err != nil {
				return fmt.Errorf("ingest benchmark (%s): %w", kind, err)
			}
			res.Ingest = append(res.Ingest, r)
		}
	}
	if c.only["rollout"] {
		for _, kind := range e.brokers() {
			log.Info("benchmark: rollout", "broker", kind, "devices", c.devices)
			r, err := e.benchRollout(ctx, kind, c.devices)
			if err != nil {
				return fmt.Errorf("rollout benchmark (%s): %w", kind, err)
			}
			res.Rollout = append(res.Rollout, r)
			if len(finished(r.Runs)) == 0 && c.fallback > 0 && c.fallback < c.devices {
				log.Info("benchmark: rollout, smaller fleet (no run finished)", "broker", kind, "devices", c.fallback)
				f, err := e.benchRollout(ctx, kind, c.fallback)
				if err != nil {
					return fmt.Errorf("rollout benchmark (%s, %d devices): %w", kind, c.fallback, err)
				}
				f.Fallback = true
				res.Rollout = append(res.Rollout, f)
			}
		}
		log.Info("benchmark: memory per simulated device")
		m, err := e.benchSimMemory(ctx, res.Rollout)
		if err != nil {
			return fmt.Errorf("simulator memory benchmark: %w", err)
		}
		res.SimMemory = m
	}
	res.evaluate()
	if c.only["rollout"] && (c.profile || res.controllerMissed()) {
		log.Info("profiling the controller through one more rollout")
		p, err := e.profileRollout(ctx, c.devices)
		if err != nil {
			return fmt.Errorf("profiled run: %w", err)
		}
		res.Profile = p
	}
	if c.only["ingest"] && (c.profile || res.ingestMissed()) {
		log.Info("profiling the controller through one more ingest run")
		p, err := e.profileIngest(ctx)
		if err != nil {
			res.Notes = append(res.Notes, "The profiled ingest run failed: "+err.Error())
		}
		res.IngestProfile = p
	}
	if c.only["go"] {
		log.Info("benchmark: go test -bench", "packages", c.goPkgs)
		g, err := e.goBenchmarks(ctx)
		if err != nil {
			res.Notes = append(res.Notes, "Go benchmarks: "+err.Error())
		}
		res.Go = g
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	res.Finished = time.Now().UTC()
	res.LoadEnd = loadAverage()
	return writeReport(c.out, res.markdown())
}
