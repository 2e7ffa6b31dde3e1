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
//	go run ./scripts/bench [-out BENCHMARKS.md] [-runs 3] [-devices 10000] [-only agent,ingest,rollout,go] [-assign]
//	go run ./scripts/bench -only rollout -profile-only -profile-broker mosquitto -runs 1   # where a rollout's time goes
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
	out      string
	runs     int
	devices  int
	joinRate int
	// simDevices is how many devices one `fleet sim` process runs.
	simDevices int
	fallback   int
	only       map[string]bool
	goPkgs     string
	goCount    int
	// goBenchtime is go test's -benchtime for the Go benchmarks.
	goBenchtime string
	mosquitto   string
	brokers     []string
	keep        bool
	profile     bool
	// profileBroker is the broker of the profiled rollout session;
	// profileOnly skips the measured sessions and runs just that one.
	profileBroker string
	profileOnly   bool
	assign        bool
	// resultsFile keeps the measurements between runs (-results).
	resultsFile string
	// rolloutTimeout bounds each rollout of the rollout benchmark.
	rolloutTimeout time.Duration
	// controllerTags are build tags of the fleet-controller measured: a
	// measuring instrument (benchnostore), never for the tables.
	controllerTags string
	root           string
}

// parts are the benchmarks -only picks from.
var parts = []string{"agent", "ingest", "rollout", "go"}

func doMain(args []string, stdout, stderr io.Writer) int {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.out, "out", "BENCHMARKS.md", "file to write the tables into (its bench section is replaced, the rest kept)")
	fs.IntVar(&c.runs, "runs", 3, "runs of each end-to-end benchmark (for the rollout: upgrade rollouts of one joined fleet); the tables show medians")
	fs.IntVar(&c.devices, "devices", 10_000, "simulated devices in the rollout benchmark")
	fs.IntVar(&c.joinRate, "join-rate", 500, "simulated devices that connect per second while the fleet joins (one -sim-devices process after the other; see joinFleet)")
	fs.IntVar(&c.simDevices, "sim-devices", defaultSimDevices, "simulated devices per `fleet sim` process")
	fs.IntVar(&c.fallback, "fallback-devices", 2000, "when no rollout run with -devices finishes, run it with this many devices too, to have figures (0: do not)")
	only := fs.String("only", strings.Join(parts, ","), "benchmarks to run: "+strings.Join(parts, ","))
	fs.StringVar(&c.goPkgs, "go-packages", "./...", "packages whose Go benchmarks run")
	fs.IntVar(&c.goCount, "go-count", 3, "runs of each Go benchmark (-count)")
	fs.StringVar(&c.goBenchtime, "go-benchtime", "200ms", "go test -benchtime of the Go benchmarks (short, so that make bench stays short; \"\" for go test's 1s)")
	brokers := fs.String("brokers", "embedded,mosquitto", "brokers to run the ingest and rollout benchmarks against: embedded, mosquitto")
	fs.StringVar(&c.mosquitto, "mosquitto", "", "mosquitto binary (default: found in PATH or /usr/sbin; without it the Mosquitto runs are skipped and the report says so)")
	fs.BoolVar(&c.keep, "keep", false, "keep the working directory (logs, profiles) instead of removing it")
	fs.BoolVar(&c.profile, "profile", false, "also profile the controller when every target is met")
	fs.StringVar(&c.profileBroker, "profile-broker", "embedded", "broker of the profiled rollout session: embedded or mosquitto")
	fs.BoolVar(&c.profileOnly, "profile-only", false, "rollout: skip the measured sessions, run only the profiled one (-profile-broker, -runs upgrade rollouts); for finding where the time goes, not for the tables")
	fs.DurationVar(&c.rolloutTimeout, "rollout-timeout", 3*time.Minute, "how long one rollout may take before the session stops and reports how far it got")
	fs.StringVar(&c.resultsFile, "results", filepath.Join(os.TempDir(), "edgefleet-bench-results.json"),
		"JSON `file` of the measurements: read first, so that the parts this run skips (-only) keep their last figures (with their dates) in the report, and written at the end; \"\" for neither")
	fs.StringVar(&c.controllerTags, "controller-tags", "", "build `tags` of fleet-controller, for measuring only: benchnostore builds one that acks telemetry without storing it (the bound no store could beat); needs -out other than BENCHMARKS.md, and keeps no -results")
	fs.BoolVar(&c.assign, "assign", false, "also measure the assignment path: one more version assigned to the whole fleet at once")
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
	if c.profileBroker != "embedded" && c.profileBroker != "mosquitto" {
		fmt.Fprintf(stderr, "bench: -profile-broker %q: choose embedded or mosquitto\n", c.profileBroker)
		return 2
	}
	if c.runs < 1 || c.devices < 1 || c.goCount < 1 || c.joinRate < 1 || c.simDevices < 1 {
		fmt.Fprintln(stderr, "bench: -runs, -devices, -join-rate, -sim-devices and -go-count must be at least 1")
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
	if c.controllerTags != "" {
		if c.out == filepath.Join(c.root, "BENCHMARKS.md") {
			fmt.Fprintln(stderr, "bench: -controller-tags builds a controller that is not the one shipped; give -out another file")
			return 2
		}
		c.resultsFile = ""
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(ctx, c, args, log); err != nil {
		fmt.Fprintln(stderr, "bench:", err)
		return 1
	}
	if !c.profileOnly {
		fmt.Fprintf(stdout, "wrote %s\n", c.out)
	}
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
		Machine:    describeMachine(ctx, c.root),
		Command:    "go run ./scripts/bench " + strings.Join(args, " "),
		Started:    time.Now().UTC(),
		Runs:       c.runs,
		JoinRate:   c.joinRate,
		SimDevices: c.simDevices,
		LoadStart:  loadAverage(),
	}
	if os.Getenv("MAKELEVEL") != "" {
		res.Command = "make bench` (`" + res.Command
	}
	if c.resultsFile != "" {
		if err := res.mergeFrom(c.resultsFile, c.only); err != nil {
			return err
		}
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
		end := res.timed("agent")
		log.Info("benchmark: agent binary and idle memory")
		a, err := e.benchAgent(ctx)
		if err != nil {
			return fmt.Errorf("agent benchmark: %w", err)
		}
		res.Agent = a
		end()
	}
	if c.only["ingest"] {
		end := res.timed("ingest")
		res.Ingest, res.IngestProfile = nil, nil
		for _, kind := range e.brokers() {
			for _, enc := range ingestEncodings {
				if enc != "plain" && kind != "embedded" {
					// Compression changes the controller's work, not
					// the broker's; once is enough to see it.
					continue
				}
				log.Info("benchmark: telemetry ingest against raw QoS 1 delivery", "broker", kind, "encoding", enc)
				r, err := e.benchIngest(ctx, kind, enc)
				if err != nil {
					return fmt.Errorf("ingest benchmark (%s, %s): %w", kind, enc, err)
				}
				res.Ingest = append(res.Ingest, r)
			}
		}
		res.evaluate()
		if c.profile || res.ingestMissed() {
			log.Info("profiling the controller through one more ingest run")
			p, err := e.profileIngest(ctx)
			if err != nil {
				res.Notes = append(res.Notes, "The profiled ingest run failed: "+err.Error())
			}
			res.IngestProfile = p
		}
		end()
	}
	if c.only["rollout"] {
		end := res.timed("rollout")
		res.Rollout, res.Profile = nil, nil
		if c.profileOnly {
			log.Info("profiling the controller and the simulators through a rollout session", "broker", c.profileBroker, "devices", c.devices)
			res.Profile = e.profileRollout(ctx, c.profileBroker, c.devices)
			end()
			return writeProfileOnly(c, res, log)
		}
		for _, kind := range e.brokers() {
			log.Info("benchmark: rollout", "broker", kind, "devices", c.devices)
			// The profile broker's session profiles one more rollout
			// after its measured ones, if they missed the target.
			r := e.benchRollout(ctx, kind, c.devices, kind == c.profileBroker)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if r.Profile != nil {
				res.Profile = r.Profile
			}
			res.Rollout = append(res.Rollout, r)
			if len(finished(r.Runs)) == 0 && c.fallback > 0 && c.fallback < c.devices {
				log.Info("benchmark: rollout, smaller fleet (no run finished)", "broker", kind, "devices", c.fallback)
				// One upgrade rollout: the smaller fleet is there to have
				// figures at all, not medians.
				runs := e.cfg.runs
				e.cfg.runs = 1
				f := e.benchRollout(ctx, kind, c.fallback, kind == c.profileBroker && res.Profile == nil)
				e.cfg.runs = runs
				f.Fallback = true
				if f.Profile != nil {
					res.Profile = f.Profile
				}
				res.Rollout = append(res.Rollout, f)
			}
		}
		log.Info("benchmark: memory per simulated device")
		m, err := e.benchSimMemory(ctx, res.Rollout)
		if err != nil {
			return fmt.Errorf("simulator memory benchmark: %w", err)
		}
		res.SimMemory = m
		res.evaluate()
		if res.Profile == nil && (c.profile || res.controllerMissed()) {
			log.Info("profiling the controller through a session of its own")
			// Profile the size that finished: a run that cannot finish
			// profiles mostly waiting. The per-device costs show at any
			// size.
			n := c.devices
			for _, r := range res.Rollout {
				if r.Fallback && len(finished(r.Runs)) > 0 {
					n = r.Devices
				}
			}
			res.Profile = e.profileRollout(ctx, c.profileBroker, n)
		}
		end()
	}
	if c.only["go"] {
		end := res.timed("go")
		log.Info("benchmark: go test -bench", "packages", c.goPkgs)
		g, err := e.goBenchmarks(ctx)
		if err != nil {
			res.Notes = append(res.Notes, "Go benchmarks: "+err.Error())
		}
		res.Go, res.GoCount, res.GoBenchtime, res.GoPkgs = g, c.goCount, c.goBenchtime, c.goPkgs
		end()
	}
	res.evaluate()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	res.Finished = time.Now().UTC()
	res.LoadEnd = loadAverage()
	if c.resultsFile != "" {
		if err := res.save(c.resultsFile); err != nil {
			return err
		}
	}
	return writeReport(c.out, res.markdown())
}

// writeProfileOnly prints what a -profile-only run found, and writes
// nothing into the report: a profiled session is slower than a measured
// one, so its figures do not belong in the tables.
func writeProfileOnly(c config, res *results, log *slog.Logger) error {
	p := res.Profile
	if p == nil {
		return errors.New("no profile")
	}
	var b strings.Builder
	s := p.Session
	fmt.Fprintf(&b, "profiled session: %s broker, %d devices, join %s, install %s, controller peak %s, err %q\n",
		s.Broker, p.Devices, secs(s.Join), secs(s.Install.Rollout), mibStr(s.CtlPeak), s.Err)
	for i, x := range s.Runs {
		fmt.Fprintf(&b, "run %d: %s in %s, controller CPU %s, simulators CPU %s, decisions %v, %s msgs/s, err %q\n",
			i+1, x.Version, secs(x.Rollout), secs(x.RolloutCPU), secs(x.SimCPU), x.Decisions, fmt.Sprintf("%.0f", x.Messages), x.Err)
	}
	fmt.Fprintf(&b, "\ncontroller CPU:\n%s\n\ncontroller heap:\n%s\n\nsimulators CPU:\n%s\n",
		strings.Join(p.CPU, "\n"), strings.Join(p.Heap, "\n"), strings.Join(p.SimCPU, "\n"))
	fmt.Fprint(os.Stdout, b.String())
	log.Info("profile-only run: BENCHMARKS.md left as it was")
	return nil
}
