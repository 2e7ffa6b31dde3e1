package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/sim"
)

// simUsage is the args column of `fleet sim` in the command list.
const simUsage = "--agents N [--labels SPEC] [--rate R] ..."

func runSim(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "sim", &g)
	var (
		o          sim.Options
		labels     = fs.String("labels", "", "label distribution, e.g. 'region=eu:60,us:40;hw=jetson,rpi5;site=s1..s20' (value:weight; a..b ranges)")
		broker     = fs.String("broker", env("EDGEFLEET_BROKER"), "MQTT broker URL (env EDGEFLEET_BROKER; default: the controller's host, port 1883)")
		failModel  = fs.String("fail-model", "", "fail only this model or model@version on the failing devices (default: every model)")
		every      = fs.Duration("every", 5*time.Second, "print the fleet's counters this often (0: only at the end)")
		runFor     = fs.Duration("for", 0, "stop after this long (0: run until interrupted)")
		logLevel   = fs.String("log-level", "info", "the simulator's log level: debug, info, warn, error")
		agentLevel = fs.String("agent-log-level", "off", "the simulated agents' log level: off, debug, info, warn, error (they are many)")
		memProfile = fs.String("memprofile", "", "write a heap profile of the simulator to `FILE` at every report (--every), for go tool pprof")
		cpuProfile = fs.String("cpuprofile", "", "write a CPU profile of the simulator to `FILE` from start to stop, for go tool pprof")
		releaseKs  stringList
		directorKs stringList
	)
	fs.Var(&releaseKs, "release-key", "release public key `file` every device pins (repeatable)")
	fs.Var(&directorKs, "director-key", "the controller's director public key `file` (its DATA/keys/director.pub) every device pins (repeatable)")
	fs.BoolVar(&o.AllowUnsigned, "allow-unsigned", false, "DEVELOPMENT ONLY: devices start without both keys and accept unsigned bundles and desired states")
	fs.IntVar(&o.Agents, "agents", 0, "number of simulated devices (required)")
	fs.Float64Var(&o.Rate, "rate", 0, "inferences per second per device on its active model")
	fs.Float64Var(&o.Offline, "offline", 0, "fraction of devices offline (they say hello once, then lose their network)")
	fs.BoolVar(&o.NeverSeen, "never-seen", false, "offline devices never connect at all")
	fs.Float64Var(&o.Failing, "fail", 0, "fraction of devices whose model fails")
	fs.Float64Var(&o.FailRate, "fail-rate", 1, "fraction of a failing device's inferences that fail")
	fs.DurationVar(&o.Network.Delay, "delay", 0, "network delay added each way, e.g. 50ms")
	fs.DurationVar(&o.Network.Jitter, "jitter", 0, "up to this much more delay, at random")
	fs.Float64Var(&o.Network.Loss, "loss", 0, "fraction of network writes lost (each arrives one TCP retransmission late)")
	fs.StringVar(&o.DataDir, "data", "", "directory for the devices' data (default: a temporary one on tmpfs, removed at exit)")
	fs.StringVar(&o.IDPrefix, "prefix", sim.DefaultIDPrefix, "device id prefix; ids are PREFIX00001 ...")
	fs.Uint64Var(&o.Seed, "seed", 1, "seed of the labels and of which devices are offline or failing")
	fs.Float64Var(&o.StartRate, "start-rate", sim.DefaultStartRate, "devices started per second")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if o.Agents <= 0 {
		return usageErr("--agents N is required: how many devices to simulate")
	}
	if o.Labels, err = sim.ParseLabels(*labels); err != nil {
		return usageErr("--labels: %v", err)
	}
	o.FailModel = sim.FailSpec(*failModel)
	o.ReleaseKeys, o.DirectorKeys = releaseKs, directorKs
	o.Controller = g.controller
	o.Broker = *broker
	if o.Broker == "" {
		if o.Broker, err = brokerNextTo(g.controller); err != nil {
			return usageErr("%v", err)
		}
	}
	if o.Logger, err = simLogger(e.stderr, *logLevel); err != nil {
		return usageErr("--log-level: %v", err)
	}
	if *agentLevel != "off" {
		if o.AgentLogger, err = simLogger(e.stderr, *agentLevel); err != nil {
			return usageErr("--agent-log-level: %v", err)
		}
	}
	switch g.output {
	case "table", "json", "yaml":
	default:
		return usageErr("-o %q: choose table, json or yaml", g.output)
	}
	s, err := sim.New(o)
	if err != nil {
		return usageErr("%v", err)
	}
	trimIdleDownloads()
	if c, err := g.client(); err == nil {
		hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		if err := c.Healthz(hctx); err != nil {
			o.Logger.Warn("the controller does not answer (yet); the devices will download bundles from it", "controller", g.controller, "err", err)
		}
		cancel()
	}

	if *cpuProfile != "" {
		stop, err := startCPUProfile(*cpuProfile)
		if err != nil {
			return err
		}
		defer stop()
	}

	if *runFor > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *runFor)
		defer cancel()
	}
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- s.Run(ctx) }()

	table := g.output == "table"
	if table {
		fmt.Fprintf(e.stdout, "simulating %d devices against broker %s and controller %s (Ctrl-C stops)\n", o.Agents, o.Broker, o.Controller)
	}
	go func() {
		if err := s.WaitJoined(ctx); err == nil {
			o.Logger.Info("simulated fleet joined", "agents", o.Agents, "took", time.Since(start).Round(time.Millisecond))
		}
	}()
	// Counters go out every --every: a table line, or (-o json) one JSON
	// object per line, which scripts such as the benchmarks read live.
	var tick <-chan time.Time
	if *every > 0 && g.output != "yaml" {
		t := time.NewTicker(*every)
		defer t.Stop()
		tick = t.C
	}
	header := true
	for {
		select {
		case err := <-done:
			if err != nil {
				return err
			}
			st := simStatus{UpSeconds: time.Since(start).Seconds(), Stats: s.Stats(), Final: true}
			if g.output == "json" {
				return json.NewEncoder(e.stdout).Encode(st)
			}
			return emit(e.stdout, g.output, st, func(tw *tabwriter.Writer) {
				simStatsTable(tw, st, header)
			})
		case <-tick:
			if *memProfile != "" {
				if err := writeHeapProfile(*memProfile); err != nil {
					return err
				}
			}
			st := simStatus{UpSeconds: time.Since(start).Seconds(), Stats: s.Stats()}
			if g.output == "json" {
				if err := json.NewEncoder(e.stdout).Encode(st); err != nil {
					return err
				}
				continue
			}
			simStatsTable(e.stdout, st, header)
			header = false
		}
	}
}

// trimIdleDownloads shortens how long this process keeps idle HTTP
// connections. Each agent downloads bundles through its own copy of
// http.DefaultTransport, which keeps the connection open for 90 s after a
// download: harmless on a device, but ten thousand simulated devices would
// hold ten thousand sockets here and as many at the controller after each
// wave, and run both out of file descriptors. This is the simulator's own
// process, so it may change the default; it does so before any agent
// copies it.
func trimIdleDownloads() {
	if tr, ok := http.DefaultTransport.(*http.Transport); ok {
		tr.IdleConnTimeout = 2 * time.Second
	}
}

// simStatus is one report of `fleet sim`: the fleet's counters, how long
// it has run, and whether it is the last report (the simulator stopped).
type simStatus struct {
	UpSeconds float64 `json:"upSeconds"`
	sim.Stats
	Final bool `json:"final,omitempty"`
}

// stringList collects a repeatable flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// writeHeapProfile replaces path with a heap profile of the process now.
func writeHeapProfile(path string) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("--memprofile: %w", err)
	}
	runtime.GC() // a profile of live memory, not of garbage
	err = pprof.WriteHeapProfile(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("--memprofile %s: %w", path, err)
	}
	return nil
}

// startCPUProfile profiles the process's CPU into path until the
// returned function is called.
func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--cpuprofile %s: %w", path, err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

// simStatsTable writes one line of the fleet's counters, in fixed-width
// columns so that the lines of a long run line up.
func simStatsTable(w io.Writer, st simStatus, header bool) {
	const format = "%-8v %8v %8v %8v %9v %8v %8v %11v %8v %10v %10v %7v\n"
	if header {
		fmt.Fprintf(w, format, "UP", "DEVICES", "POWERED", "ONLINE", "CONNECTED", "JOINED", "FAILING", "INFERENCES", "ERRORS", "PUBLISHED", "RECEIVED", "MODELS")
	}
	up := time.Duration(st.UpSeconds * float64(time.Second)).Round(time.Second)
	fmt.Fprintf(w, format, up, st.Agents, st.Powered, st.Online, st.Connected, st.Joined, st.Failing,
		st.Inferences, st.InferenceErrors, st.Published, st.Received, st.ModelsLoaded)
}

// brokerNextTo guesses the broker of a controller that embeds one: the
// same host, the MQTT port.
func brokerNextTo(controller string) (string, error) {
	u, err := url.Parse(controller)
	if err != nil || u.Hostname() == "" {
		return "", fmt.Errorf("controller URL %q: cannot tell the broker from it; set --broker tcp://HOST:1883", controller)
	}
	return "tcp://" + net.JoinHostPort(u.Hostname(), "1883"), nil
}

func simLogger(w io.Writer, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		return nil, errors.New("want debug, info, warn or error")
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}
