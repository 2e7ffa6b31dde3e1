package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/scripts/internal/agentbuild"
)

// results is everything one bench run measured.
type results struct {
	Machine           machine
	Command           string
	Started, Finished time.Time
	Runs              int
	JoinRate          int
	// SimDevices is how many devices one `fleet sim` process ran.
	SimDevices    int
	Agent         *agentResult
	Ingest        []ingestResult
	Rollout       []rolloutResult
	SimMemory     *simMemory
	Profile       *controllerProfile
	IngestProfile *ingestProfile
	Go            []goBench
	GoCount       int
	GoBenchtime   string
	GoPkgs        string
	Notes         []string
	Targets       []target
	// LoadStart and LoadEnd are /proc/loadavg's first three fields: other
	// work on the machine shows there and makes every figure worse.
	LoadStart, LoadEnd string
	// Parts says when each part ran ("agent", "ingest", "rollout", "go")
	// and under which load, since with -results they may come from
	// different runs.
	Parts map[string]*partTime
}

// partTime is when one part of the benchmarks ran.
type partTime struct {
	Command            string
	Started, Finished  time.Time
	LoadStart, LoadEnd string
}

// timed records the start of a part; the function it returns records
// its end.
func (r *results) timed(part string) func() {
	if r.Parts == nil {
		r.Parts = map[string]*partTime{}
	}
	p := &partTime{Command: r.Command, Started: time.Now().UTC(), LoadStart: loadAverage()}
	r.Parts[part] = p
	return func() { p.Finished, p.LoadEnd = time.Now().UTC(), loadAverage() }
}

// when renders when a part ran, for its section.
func (r *results) when(part string) string {
	p := r.Parts[part]
	if p == nil {
		return ""
	}
	return fmt.Sprintf("Measured %s to %s UTC by `%s`; load average (1, 5, 15 min) %s at the start, %s at the end.\n\n",
		p.Started.Format("2006-01-02 15:04"), p.Finished.Format("15:04"), p.Command, p.LoadStart, p.LoadEnd)
}

// maxResults caps the -results file read back.
const maxResults = 16 << 20

// mergeFrom takes from a -results file the parts this run does not
// measure; a missing file is no error.
func (r *results) mergeFrom(path string, only map[string]bool) error {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(data) > maxResults {
		return fmt.Errorf("-results %s is over %d bytes; is it the right file?", path, maxResults)
	}
	var old results
	if err := json.Unmarshal(data, &old); err != nil {
		return fmt.Errorf("-results %s: %w; delete it to start afresh", path, err)
	}
	keep := func(part string) bool {
		if only[part] || old.Parts[part] == nil {
			return false
		}
		if r.Parts == nil {
			r.Parts = map[string]*partTime{}
		}
		r.Parts[part] = old.Parts[part]
		return true
	}
	if keep("agent") {
		r.Agent = old.Agent
	}
	if keep("ingest") {
		r.Ingest, r.IngestProfile = old.Ingest, old.IngestProfile
	}
	if keep("rollout") {
		r.Rollout, r.SimMemory, r.Profile, r.JoinRate, r.SimDevices = old.Rollout, old.SimMemory, old.Profile, old.JoinRate, old.SimDevices
	}
	if keep("go") {
		r.Go, r.GoCount, r.GoBenchtime, r.GoPkgs = old.Go, old.GoCount, old.GoBenchtime, old.GoPkgs
	}
	return nil
}

// save writes the measurements for a later -results run.
func (r *results) save(path string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o644)
}

// target is one of issue 9's targets and how the run fared.
type target struct {
	What, Goal, Measured string
	// Met is nil when the target was not measured in this run.
	Met *bool
	// Miss says by how much a missed target was missed.
	Miss string
	// controller marks targets on the controller's speed or memory, which
	// a profile explains; ingest the ingest one.
	controller, ingest bool
}

// The targets (issue 9).
const (
	targetRollout  = 60 * time.Second
	targetDecision = time.Second
	// The GB and MB are read as decimal units, the stricter
	// reading, for all three sizes alike.
	targetCtlMemory   = 1_000_000_000
	targetBinary      = 15_000_000
	targetIdleRSS     = 20_000_000
	targetIngestRatio = 0.8
)

// evaluate fills in Targets from the measurements.
func (r *results) evaluate() {
	r.Targets = nil
	add := func(what, goal, measured string, met bool, miss string, ctl bool) {
		r.Targets = append(r.Targets, target{What: what, Goal: goal, Measured: measured, Met: &met, Miss: miss, controller: ctl,
			ingest: strings.Contains(what, "ingest")})
	}
	for _, ro := range r.Rollout {
		if ro.Fallback {
			continue
		}
		what := func(w string) string { return fmt.Sprintf("%s (%s broker)", w, ro.Broker) }
		name := fmt.Sprintf("%d devices, 4 waves, zero soak", ro.Devices)
		rs := finished(ro.Runs)
		if len(rs) == 0 {
			why := ro.Err
			if len(ro.Runs) > 0 {
				why = ro.Runs[0].Err
			}
			add(what(name), "< 60 s", "did not finish", false, "no run finished: "+cell(why), true)
		} else {
			wall := medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.Rollout }))
			add(what(name), "< 60 s", secs(wall), wall < targetRollout, over(wall.Seconds(), targetRollout.Seconds(), "s"), true)
			dec := medianDur(pick(rs, func(x rolloutRun) time.Duration { return maxDur(x.Decisions) }))
			add(what("wave decision latency, worst wave"), "< 1 s", decision(dec), dec < targetDecision,
				over(dec.Seconds(), targetDecision.Seconds(), "s"), true)
		}
		if ro.CtlPeak > 0 {
			add(what("controller peak memory"), "< 1 GB (953.7 MiB)", mibStr(ro.CtlPeak), ro.CtlPeak < targetCtlMemory,
				over(mib(ro.CtlPeak), mib(targetCtlMemory), " MiB"), true)
		}
	}
	for _, in := range r.Ingest {
		ratio := medianFloat(ratios(in))
		add(fmt.Sprintf("controller ingest / raw QoS 1 delivery (%s broker, %s batches)", in.Broker, in.Encoding), "≥ 0.8×", fmt.Sprintf("%.2f×", ratio),
			ratio >= targetIngestRatio, under(ratio, targetIngestRatio, "×"), true)
	}
	if a := r.Agent; a != nil {
		add("agent: stripped static binary", "≤ 15 MB (15,000,000 bytes)", fmt.Sprintf("%s (static: %v)", binarySize(a.BinaryBytes), a.Static),
			a.BinaryBytes <= targetBinary && a.Static, over(float64(a.BinaryBytes)/1e6, float64(targetBinary)/1e6, " MB"), false)
		if len(a.Idle) > 0 {
			rss := median(a.Idle[0].RSS)
			add("agent: idle resident memory, one compiled model ("+a.Idle[0].Model+")", "≤ 20 MB (19.1 MiB)", mibStr(rss), rss <= targetIdleRSS,
				over(mib(rss), mib(targetIdleRSS), " MiB"), false)
		}
	}
}

// finished returns the runs that finished.
func finished(runs []rolloutRun) []rolloutRun {
	var out []rolloutRun
	for _, r := range runs {
		if r.Err == "" {
			out = append(out, r)
		}
	}
	return out
}

// controllerMissed reports whether a target on the controller was missed;
// ingestMissed whether the ingest one was.
func (r *results) controllerMissed() bool {
	return r.missed(func(t target) bool { return t.controller && !t.ingest })
}
func (r *results) ingestMissed() bool { return r.missed(func(t target) bool { return t.ingest }) }

func (r *results) missed(which func(target) bool) bool {
	for _, t := range r.Targets {
		if which(t) && t.Met != nil && !*t.Met {
			return true
		}
	}
	return false
}

func ratios(in ingestResult) []float64 {
	var out []float64
	for i := range in.Raw {
		if i < len(in.Ingest) && in.Raw[i] > 0 {
			out = append(out, in.Ingest[i]/in.Raw[i])
		}
	}
	return out
}

func over(got, limit float64, unit string) string {
	if got <= limit {
		return ""
	}
	return fmt.Sprintf("over by %.3g%s (%.0f%%)", got-limit, unit, 100*(got-limit)/limit)
}

func under(got, limit float64, unit string) string {
	if got >= limit {
		return ""
	}
	return fmt.Sprintf("short by %.2g%s (%.0f%%)", limit-got, unit, 100*(limit-got)/limit)
}

func pick[T, V any](xs []T, f func(T) V) []V {
	out := make([]V, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

func median(vs []int64) int64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func medianDur(vs []time.Duration) time.Duration {
	return time.Duration(median(pick(vs, func(d time.Duration) int64 { return int64(d) })))
}

func maxDur(vs []time.Duration) time.Duration {
	var m time.Duration
	for _, v := range vs {
		m = max(m, v)
	}
	return m
}

func secs(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }
func ms(d time.Duration) string   { return fmt.Sprintf("%d ms", d.Milliseconds()) }

// decision renders a wave decision latency, to the millisecond (to a
// tenth of one below 10 ms).
func decision(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000)
	}
	return ms(d)
}

// rate renders a rate with a k or M suffix.
func rate(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.0fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

func mibStr(n int64) string { return fmt.Sprintf("%.1f MiB", mib(n)) }

// binarySize is a file size in bytes, decimal megabytes and MiB, since
// "MB" is read both ways.
func binarySize(n int64) string {
	return fmt.Sprintf("%s bytes (%.2f MB, %.2f MiB)", thousands(n), float64(n)/1e6, mib(n))
}

// thousands writes n with commas between groups of three digits.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// Markers delimit the section this program owns in BENCHMARKS.md.
const (
	beginMarker = "<!-- BEGIN scripts/bench: written by `make bench`; change scripts/bench, not this section -->"
	endMarker   = "<!-- END scripts/bench -->"
)

// maxReport caps the BENCHMARKS.md read back.
const maxReport = 4 << 20

// writeReport puts section into the file at path between the markers,
// keeping everything else; a file without them gets the section at its
// end, and a missing file is created.
func writeReport(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if len(old) > maxReport {
		return fmt.Errorf("%s is over %d bytes; is it the right file?", path, maxReport)
	}
	out, err := replaceSection(string(old), section)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(out), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// replaceSection returns doc with its marked section replaced by section.
func replaceSection(doc, section string) (string, error) {
	block := beginMarker + "\n" + strings.TrimRight(section, "\n") + "\n" + endMarker + "\n"
	if strings.TrimSpace(doc) == "" {
		return "# Benchmarks\n\nEach section below is written by the program it names; run it again to update it.\n\n" + block, nil
	}
	b := strings.Index(doc, beginMarker)
	e := strings.Index(doc, endMarker)
	switch {
	case b < 0 && e < 0:
		return strings.TrimRight(doc, "\n") + "\n\n" + block, nil
	case b < 0 || e < b || strings.Count(doc, beginMarker) > 1 || strings.Count(doc, endMarker) > 1:
		return "", errors.New("its scripts/bench markers are damaged; restore one BEGIN and one END marker (or delete both and the text between)")
	}
	return doc[:b] + block + strings.TrimPrefix(doc[e+len(endMarker):], "\n"), nil
}

// markdown renders the section.
func (r *results) markdown() string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	m := r.Machine
	w("## Issue 9: a simulated fleet at scale, end to end (`make bench`)\n\n")
	commit := m.Commit
	if m.Dirty {
		commit += " with uncommitted changes"
	}
	w("Command: `%s`. Date: %s (took %s). Commit: %s.  \n", r.Command, r.Started.Format("2006-01-02 15:04 UTC"),
		r.Finished.Sub(r.Started).Round(time.Minute), commit)
	w("Machine: %d cores, %s, %.1f GiB RAM, %s, %s.  \n", m.Cores, m.CPU, float64(m.MemBytes)/(1<<30), m.Kernel, m.Go)
	w("Load average (1, 5, 15 min) at the start: %s; at the end: %s.  \n", r.LoadStart, r.LoadEnd)
	w("Every figure is the median of %d runs; the controller, the simulator and Mosquitto run as separate processes on this one machine.\n\n", r.Runs)

	if len(r.Targets) > 0 {
		w("### Targets\n\n| target | goal | measured | |\n|---|---|---|---|\n")
		for _, t := range r.Targets {
			verdict := "not measured"
			if t.Met != nil && *t.Met {
				verdict = "met"
			} else if t.Met != nil {
				verdict = "**missed**: " + t.Miss
			}
			w("| %s | %s | %s | %s |\n", t.What, t.Goal, t.Measured, verdict)
		}
		w("\n")
	}

	if len(r.Rollout) > 0 {
		w("### Rollout to %d simulated devices\n\n", r.Rollout[0].Devices)
		w("%s", r.when("rollout"))
		w("The simulated fleet (`fleet sim`, real agent code: MQTT link, reconcile, download with digest, release signature and "+
			"director signature checks, wazero, health watch, spool; %d devices per process) joins a fresh controller, %d devices/s "+
			"within a process and one process after the other, each once the controller lists the last one's devices online (see "+
			"`joinFleet` in scripts/bench for why). `%s` 1.0.0 is installed by a rollout (first download and compile on every device), "+
			"then **each run is one upgrade rollout of the same fleet** to the next version (2.0.0, 3.0.0, ...), all with `waves: [%s]`, "+
			"`soak: 0s`, no gates. Rollout wall time runs from the request until the rollout succeeded and every device reports the "+
			"new version; controller CPU is its user+system time over that span; MQTT messages are the PUBLISH packets the simulated "+
			"devices sent and received per second during the rollout; the wave decision latency is the controller's own record of each "+
			"wave (`decisionMs` in the rollout's API view): from receiving the report that finished the wave's last device to having "+
			"stored the next wave's start (or the rollout's end) and published its first desired states (worst wave of the run, the "+
			"last wave's decision to end the rollout included). The rollout's status is read every %d ms while it runs. Controller "+
			"memory: resident with the fleet joined, and its peak (VmHWM) over the whole session, join included.\n\n",
			cmp.Or(r.SimDevices, 2000), r.JoinRate, benchModel, strings.Join(rolloutWaves, ", "), pollEvery.Milliseconds())
		w("| broker | devices | upgrade rollout: wall time | controller CPU | wave decision latency (worst) | MQTT messages/s | controller memory idle / peak | install rollout | fleet join |\n")
		w("|---|---|---|---|---|---|---|---|---|\n")
		for _, ro := range r.Rollout {
			rs := finished(ro.Runs)
			devices := fmt.Sprint(ro.Devices)
			if ro.Fallback {
				devices += " (smaller fleet: no run with the full one finished)"
			}
			wall, cpu, dec, msgs := "no run finished", "", "", ""
			if len(rs) > 0 {
				wall = secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.Rollout })))
				if len(rs) < len(ro.Runs) {
					wall += fmt.Sprintf(" (%d of %d runs finished)", len(rs), len(ro.Runs))
				}
				cpu = secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.RolloutCPU })))
				dec = decision(medianDur(pick(rs, func(x rolloutRun) time.Duration { return maxDur(x.Decisions) })))
				msgs = fmt.Sprintf("%.0f", medianFloat(pick(rs, func(x rolloutRun) float64 { return x.Messages })))
			}
			install := "-"
			if ro.Install.Version != "" {
				install = secs(ro.Install.Rollout)
				if ro.Install.Err != "" {
					install += ", did not finish"
				}
			}
			w("| %s | %s | %s | %s | %s | %s | %s / %s | %s | %s |\n", ro.Broker, devices, wall, cpu, dec, msgs,
				mibStr(ro.CtlIdle), mibStr(ro.CtlPeak), install, secs(ro.Join))
		}
		w("\nEvery rollout (simulators CPU: every `fleet sim` process's user+system time over the rollout, on the same two cores):\n\n" +
			"| broker | devices | rollout | wall time | phase | decision latencies | controller CPU | simulators CPU | MQTT messages/s | error |\n|---|---|---|---|---|---|---|---|---|---|\n")
		for _, ro := range r.Rollout {
			if ro.Install.Version != "" {
				w("%s", rolloutRow(ro, "install "+ro.Install.Version, ro.Install))
			}
			for i, x := range ro.Runs {
				w("%s", rolloutRow(ro, fmt.Sprintf("run %d: %s", i+1, x.Version), x))
			}
			if ro.Err != "" {
				w("| %s | %d | session | | stopped | | | | | %s |\n", ro.Broker, ro.Devices, cell(ro.Err))
			}
			if ro.Dropped > 0 {
				w("| %s | %d | session | | | | | | | the embedded broker dropped %d device messages for the controller's session (over mochi's in-flight limit) |\n",
					ro.Broker, ro.Devices, ro.Dropped)
			}
			if ro.Assign > 0 {
				a := fmt.Sprintf("%s, controller CPU %s", secs(ro.Assign), secs(ro.AssignCPU))
				if ro.AssignErr != "" {
					a = "did not finish: " + cell(ro.AssignErr)
				}
				w("| %s | %d | assignment path (every device at once) | %s | | | | | | |\n", ro.Broker, ro.Devices, a)
			}
		}
		w("\n")
	}

	if len(r.Ingest) > 0 {
		w("### Telemetry ingest against raw QoS 1 delivery\n\n")
		w("%s", r.when("ingest"))
		w("%d devices (MQTT clients in scripts/bench) send %d sealed telemetry batches each (%d inference records a batch, the "+
			"agent's spool batch; plain `TelemetryBatch` or zstd-compressed `telemetry_zstd`; the same payloads in both phases), QoS 1, "+
			"each device keeping at most %d batches unanswered, as the agent's telemetry sender does. Raw: a batch is answered when one "+
			"subscriber on the same broker, which does nothing else, has received it. Ingest: when the `fleet-controller` process has "+
			"decoded it, stored it (SQLite, exactly once by device, spool epoch and sequence) and its ack has reached the device; the "+
			"controller's `edgefleet_controller_telemetry_batches_total` must agree. Each run is three phases on the same broker, one after "+
			"the other: raw, ingest, raw again; its raw rate is the mean of the two raw phases, so load from elsewhere that comes or goes "+
			"during a run weighs on both sides alike. An ingest phase is cut at %s and its rate taken over what was acknowledged by then.\n\n",
			ingestPublishers, ingestBatches, ingestRecords, ingestWindow, ingestMaxPhase)
		w("| broker | batches | batch on the wire | raw delivery | controller ingest | ingest / raw (per run) |\n|---|---|---|---|---|---|\n")
		for _, in := range r.Ingest {
			var per []string
			for _, x := range ratios(in) {
				per = append(per, fmt.Sprintf("%.2f", x))
			}
			capped := ""
			if in.Capped > 0 {
				capped = fmt.Sprintf(" (%d of %d runs cut at %s)", in.Capped, len(in.Ingest), ingestMaxPhase)
			}
			w("| %s, %s | %d | %d B | %s records/s | %s records/s%s | **%.2f×** (%s) |\n", in.Broker, in.Encoding, in.Messages, in.PayloadBytes,
				rate(medianFloat(in.Raw)), rate(medianFloat(in.Ingest)), capped, medianFloat(ratios(in)), strings.Join(per, ", "))
		}
		w("\n")
	}

	if r.Agent != nil || r.SimMemory != nil {
		w("### Agent\n\n")
		if r.Agent != nil {
			w("%s", r.when("agent"))
		}
		w("| what | measured |\n|---|---|\n")
		if a := r.Agent; a != nil {
			w("| `fleet-agent` binary, built as `make build` builds it (scripts/internal/agentbuild: CGO_ENABLED=0, -trimpath, %s, -ldflags '%s') | %s, static: %v |\n",
				"-tags="+strings.Join(agentbuild.Tags, ","), agentbuild.Strip, binarySize(a.BinaryBytes), a.Static)
			for _, im := range a.Idle {
				split := ""
				if len(im.Anon) > 0 {
					split = fmt.Sprintf(" (anonymous %s: Go heap and stacks, wazero's compiled code, SQLite's cache; file-backed %s: the binary's pages in use)",
						mibStr(median(im.Anon)), mibStr(median(im.File)))
				}
				w("| idle resident memory (VmRSS), serving %s (%s module), %s after 20 inferences (%s) | %s%s |\n",
					im.Model, sizeStr(im.ModuleSize), idleSettle, im.setting(), mibStr(median(im.RSS)), split)
			}
		}
		if s := r.SimMemory; s != nil && s.Large > 0 {
			w("| memory per simulated device: simulators' RSS / devices, %d devices in %d processes, each running one model | %.0f KiB |\n",
				s.Large, s.LargeProcs, float64(s.LargeRSS)/float64(s.Large)/1024)
		}
		if s := r.SimMemory; s != nil && s.Small > 0 && s.SmallRSS > 0 {
			w("| memory per simulated device: simulator RSS / devices, %d devices in one process, each running one model | %.0f KiB |\n",
				s.Small, float64(s.SmallRSS)/float64(s.Small)/1024)
		}
		w("\n")
		if a := r.Agent; a != nil && len(a.BySize) > 0 {
			w("Where the agent binary's bytes go (symbol sizes from `go tool nm -size` of the same build with its symbol table, by module):\n\n```\n%s\n```\n\n",
				strings.Join(a.BySize, "\n"))
		}
		if s := r.SimMemory; s != nil && len(s.Top) > 0 {
			w("Where a simulated device's memory goes (heap in use, `fleet sim --memprofile`, %d devices, each running one model):\n\n```\n%s\n```\n\n", s.Small, strings.Join(s.Top, "\n"))
		}
	}

	if p := r.Profile; p != nil {
		w("### Where the controller's time and memory go\n\n")
		run := rolloutRun{Err: p.Session.Err}
		if len(p.Session.Runs) > 0 {
			run = p.Session.Runs[0]
		}
		broker := p.Broker
		if broker == "" {
			broker = "embedded"
		}
		if p.InSession {
			w("One more upgrade rollout of the %s-broker session's fleet of %d devices, after its measured ones and not counted in them, "+
				"the controller's CPU profiled over that rollout alone (runtime/pprof in the same controller code as `fleet-controller`, built "+
				"into scripts/bench, which ran the whole session): %s with %s of controller CPU and %s of the simulators'%s; heap in use at "+
				"its end; the controller's peak resident memory %s.\n\n",
				broker, p.Devices, secs(run.Rollout), secs(run.RolloutCPU), secs(run.SimCPU), errNote(run.Err), mibStr(p.Session.CtlPeak))
		} else {
			w("One more %s-broker session with %d devices and %d upgrade rollout(s), the controller under runtime/pprof (the same code as "+
				"`fleet-controller`, built into scripts/bench): CPU profiled from the fleet's join to the end of the session (join %s, install "+
				"rollout %s, upgrade rollout %s with %s of controller CPU%s; peak resident memory %s), heap in use at the end.\n\n",
				broker, p.Devices, max(1, len(p.Session.Runs)), secs(p.Session.Join), secs(p.Session.Install.Rollout), secs(run.Rollout), secs(run.RolloutCPU), errNote(run.Err), mibStr(p.Session.CtlPeak))
		}
		if len(p.CPU) > 0 {
			w("CPU:\n\n```\n%s\n```\n\n", strings.Join(p.CPU, "\n"))
		}
		if len(p.Heap) > 0 {
			w("Heap in use:\n\n```\n%s\n```\n\n", strings.Join(p.Heap, "\n"))
		}
		if len(p.SimCPU) > 0 {
			w("The simulators' CPU over the same session, every `fleet sim` process's profile merged (`fleet sim --cpuprofile`, "+
				"from their start to their stop: the join, the install and every rollout):\n\n```\n%s\n```\n\n", strings.Join(p.SimCPU, "\n"))
		}
	}

	if p := r.IngestProfile; p != nil && len(p.CPU) > 0 {
		w("### Where the controller's time goes in telemetry ingest\n\n")
		w("The ingest phase once more on the embedded broker (plain batches), the controller under runtime/pprof, CPU profiled over the phase (%.0f records/s):\n\n```\n%s\n```\n\n",
			p.Rate, strings.Join(p.CPU, "\n"))
	}

	if len(r.Go) > 0 {
		bt := ""
		if r.GoBenchtime != "" {
			bt = " -benchtime " + r.GoBenchtime
		}
		w("### Go benchmarks\n\n%s", r.when("go"))
		w("The hot paths' own benchmarks, every package, in one command: `go test -run '^$' -bench . -benchmem -count %d%s %s` "+
			"(`go run ./scripts/bench -only go` runs it and rewrites this section); medians of the %d runs. The sections of the issues above "+
			"explain each benchmark and give longer runs.\n\n", r.GoCount, bt, r.GoPkgs, r.GoCount)
		w("| package | benchmark | ns/op | B/op | allocs/op | other |\n|---|---|---|---|---|---|\n")
		for _, g := range r.Go {
			var other []string
			units := make([]string, 0, len(g.Metrics))
			for u := range g.Metrics {
				units = append(units, u)
			}
			sort.Strings(units)
			for _, u := range units {
				if u != "ns/op" && u != "B/op" && u != "allocs/op" {
					other = append(other, fmt.Sprintf("%.4g %s", g.Metrics[u], u))
				}
			}
			w("| %s | %s | %s | %s | %s | %s |\n", strings.TrimPrefix(g.Pkg, "github.com/edgefleet/edgefleet/"), g.Name,
				num(g.Metrics, "ns/op"), num(g.Metrics, "B/op"), num(g.Metrics, "allocs/op"), strings.Join(other, ", "))
		}
		w("\n")
	}

	if len(r.Notes) > 0 {
		w("### Notes\n\n")
		for _, n := range r.Notes {
			w("- %s\n", n)
		}
		w("\n")
	}
	return b.String()
}

// rolloutRow is one line of the every-rollout table.
func rolloutRow(ro rolloutResult, what string, x rolloutRun) string {
	var decs []string
	for _, d := range x.Decisions {
		decs = append(decs, decision(d))
	}
	phase := x.Phase
	if x.Err != "" {
		phase += fmt.Sprintf(" (%d of %d devices on %s when the bench stopped waiting)", x.Done, ro.Devices, x.Version)
	}
	simCPU := ""
	if x.SimCPU > 0 {
		simCPU = secs(x.SimCPU)
	}
	return fmt.Sprintf("| %s | %d | %s | %s | %s | %s | %s | %s | %.0f | %s |\n", ro.Broker, ro.Devices, what, secs(x.Rollout), phase,
		strings.Join(decs, ", "), secs(x.RolloutCPU), simCPU, x.Messages, cell(x.Err))
}

func errNote(err string) string {
	if err == "" {
		return ""
	}
	return "; the run did not finish: " + cell(err)
}

// cell makes text safe in a table cell.
func cell(s string) string {
	s = strings.ReplaceAll(strings.ReplaceAll(s, "\n", " "), "|", "/")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

func num(m map[string]float64, unit string) string {
	v, ok := m[unit]
	if !ok {
		return "-"
	}
	return fmt.Sprintf("%.4g", v)
}

func sizeStr(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.0f KiB", float64(n)/1024)
}
