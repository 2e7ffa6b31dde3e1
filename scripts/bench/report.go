package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"
)

// results is everything one bench run measured.
type results struct {
	Machine           machine
	Command           string
	Started, Finished time.Time
	Runs              int
	Agent             *agentResult
	Ingest            []ingestResult
	Rollout           []rolloutResult
	SimMemory         *simMemory
	Profile           *controllerProfile
	IngestProfile     *ingestProfile
	Go                []goBench
	Notes             []string
	Targets           []target
	// LoadStart and LoadEnd are /proc/loadavg's first three fields: other
	// work on the machine shows there and makes every figure worse.
	LoadStart, LoadEnd string
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
	targetRollout     = 60 * time.Second
	targetDecision    = time.Second
	targetCtlMemory   = 1 << 30
	targetBinary      = 15 << 20
	targetIdleRSS     = 20 << 20
	targetIngestRatio = 0.8
)

// evaluate fills in Targets from the measurements.
func (r *results) evaluate() {
	r.Targets = nil
	add := func(what, goal, measured string, met bool, miss string, ctl bool) {
		r.Targets = append(r.Targets, target{What: what, Goal: goal, Measured: measured, Met: &met, Miss: miss, controller: ctl,
			ingest: strings.Contains(what, "ingest")})
	}
	for _, all := range r.Rollout {
		if len(all.Runs) == 0 || all.Fallback {
			continue
		}
		ro := rolloutResult{Broker: all.Broker, Runs: finished(all.Runs)}
		if len(ro.Runs) == 0 {
			add(fmt.Sprintf("%d devices, 4 waves, zero soak (%s broker)", all.Runs[0].Devices, all.Broker), "< 60 s", "did not finish",
				false, "no run finished: "+all.Runs[0].Err, true)
			continue
		}
		n := ro.Runs[0].Devices
		engine := ro.Runs[0].Engine
		wall := medianDur(pick(ro.Runs, func(x rolloutRun) time.Duration { return x.Rollout }))
		what := fmt.Sprintf("%d devices, 4 waves, zero soak (%s broker)", n, ro.Broker)
		if !engine {
			wall = medianDur(pick(ro.Runs, func(x rolloutRun) time.Duration { return x.Assign }))
			what = fmt.Sprintf("%d devices, assignment path (no rollout engine) (%s broker)", n, ro.Broker)
		}
		add(what, "< 60 s", secs(wall), wall < targetRollout, over(wall.Seconds(), targetRollout.Seconds(), "s"), true)
		if engine {
			dec := medianDur(pick(ro.Runs, func(x rolloutRun) time.Duration { return maxDur(x.Decisions) }))
			add(fmt.Sprintf("wave decision latency, worst wave (%s broker)", ro.Broker), "< 1 s", decision(dec), dec < targetDecision,
				over(dec.Seconds(), targetDecision.Seconds(), "s"), true)
		}
		peak := median(pick(ro.Runs, func(x rolloutRun) int64 { return x.CtlPeak }))
		add(fmt.Sprintf("controller peak memory (%s broker)", ro.Broker), "< 1 GiB", mibStr(peak), peak < targetCtlMemory,
			over(mib(peak), mib(targetCtlMemory), " MiB"), true)
	}
	for _, in := range r.Ingest {
		ratio := medianFloat(ratios(in))
		add(fmt.Sprintf("controller ingest / raw QoS 1 delivery (%s broker)", in.Broker), "≥ 0.8×", fmt.Sprintf("%.2f×", ratio),
			ratio >= targetIngestRatio, under(ratio, targetIngestRatio, "×"), true)
	}
	if a := r.Agent; a != nil {
		add("agent: stripped static binary", "≤ 15 MiB", fmt.Sprintf("%s (static: %v)", mibStr(a.BinaryBytes), a.Static),
			a.BinaryBytes <= targetBinary && a.Static, over(mib(a.BinaryBytes), mib(targetBinary), " MiB"), false)
		if len(a.Idle) > 0 {
			rss := median(a.Idle[0].RSS)
			add("agent: idle resident memory, one compiled model ("+a.Idle[0].Model+")", "≤ 20 MiB", mibStr(rss), rss <= targetIdleRSS,
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

// decision renders a wave decision latency: one seen within a single
// poll of the rollout is only known to be under the poll interval.
func decision(d time.Duration) string {
	if d < pollEvery {
		return fmt.Sprintf("< %d ms", pollEvery.Milliseconds())
	}
	return ms(d)
}
func mibStr(n int64) string { return fmt.Sprintf("%.1f MiB", mib(n)) }

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
	w("## End-to-end benchmarks\n\n")
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
		n := 0
		for _, ro := range r.Rollout {
			if len(ro.Runs) > 0 {
				n = ro.Runs[0].Devices
			}
		}
		w("### Rollout to %d simulated devices\n\n", n)
		w("`fleet sim --agents %d` (real agent code: MQTT link, reconcile, download, wazero, spool) joins a fresh controller; "+
			"`%s` 1.0.0 is assigned to every device at once (the assignment path), then 2.0.0 is rolled out with "+
			"`waves: [%s]`, `soak: 0s`, no gates. Wall time runs from the request to the rollout's success with every device "+
			"reporting the new version; controller CPU is user+system time over that span; MQTT messages are the PUBLISH "+
			"packets the simulated devices sent and received per second during the rollout; the wave decision latency is the "+
			"time from the last device of a wave counting as succeeded to the first device of the next being notified, "+
			"as seen polling the rollout every %d ms (worst wave of the run).\n\n",
			n, benchModel, strings.Join(rolloutWaves, ", "), pollEvery.Milliseconds())
		w("| broker | devices | rollout wall time | controller CPU | wave decision latency (worst) | MQTT messages/s | controller memory idle / peak | assignment to all: wall (controller CPU) | fleet join |\n")
		w("|---|---|---|---|---|---|---|---|---|\n")
		for _, ro := range r.Rollout {
			rs := finished(ro.Runs)
			devices := fmt.Sprint(ro.Runs[0].Devices)
			if ro.Fallback {
				devices += " (smaller fleet: no run with the full one finished)"
			}
			if len(rs) == 0 {
				w("| %s | %s | no run finished | | | | | | |\n", ro.Broker, devices)
				continue
			}
			wall, cpu, dec := "no rollout engine", "-", "-"
			if rs[0].Engine {
				wall = secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.Rollout })))
				cpu = secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.RolloutCPU })))
				dec = decision(medianDur(pick(rs, func(x rolloutRun) time.Duration { return maxDur(x.Decisions) })))
			}
			w("| %s | %s | %s | %s | %s | %.0f | %s / %s | %s (%s) | %s |\n", ro.Broker, devices, wall, cpu, dec,
				medianFloat(pick(rs, func(x rolloutRun) float64 { return x.Messages })),
				mibStr(median(pick(rs, func(x rolloutRun) int64 { return x.CtlIdle }))),
				mibStr(median(pick(rs, func(x rolloutRun) int64 { return x.CtlPeak }))),
				secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.Assign }))),
				secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.AssignCPU }))),
				secs(medianDur(pick(rs, func(x rolloutRun) time.Duration { return x.Join }))))
		}
		w("\nEvery run:\n\n| broker | devices | run | rollout | phase | decision latencies | controller CPU | peak memory | assign | join | error |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, ro := range r.Rollout {
			for i, x := range ro.Runs {
				var decs []string
				for _, d := range x.Decisions {
					decs = append(decs, decision(d))
				}
				w("| %s | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", ro.Broker, x.Devices, i+1, secs(x.Rollout), x.Phase, strings.Join(decs, ", "),
					secs(x.RolloutCPU), mibStr(x.CtlPeak), secs(x.Assign), secs(x.Join), cell(x.Err))
			}
		}
		w("\n")
	}

	if len(r.Ingest) > 0 {
		w("### Telemetry ingest against raw QoS 1 delivery\n\n")
		w("%d simulated devices (MQTT clients in scripts/bench) send %d sealed telemetry batches each (%d inference records; the same "+
			"payloads in both phases), QoS 1, each device keeping at most %d batches unanswered, as the agent's telemetry sender does. "+
			"Raw: a batch is answered when one subscriber on the same broker, which does nothing else, has received it. Ingest: when "+
			"the controller has decoded it, stored it (SQLite, exactly once by device, spool epoch and sequence) and its ack has reached "+
			"the device; the controller's `edgefleet_controller_telemetry_batches_total` must agree. Both phases run in the same run, on "+
			"the same broker, one after the other.\n\n", ingestPublishers, ingestBatches, ingestRecords, ingestWindow)
		w("| broker | messages | payload | raw delivery | controller ingest | ingest / raw |\n|---|---|---|---|---|---|\n")
		for _, in := range r.Ingest {
			w("| %s | %d | %d B | %.0f msg/s | %.0f batches/s (%.0f records/s) | %.2f× |\n", in.Broker, in.Messages, in.PayloadBytes,
				medianFloat(in.Raw), medianFloat(in.Ingest), medianFloat(in.Ingest)*ingestRecords, medianFloat(ratios(in)))
		}
		w("\n")
	}

	if r.Agent != nil || r.SimMemory != nil {
		w("### Agent\n\n| what | measured |\n|---|---|\n")
		if a := r.Agent; a != nil {
			w("| `fleet-agent` binary (CGO_ENABLED=0, -trimpath, -ldflags '-s -w') | %s, static: %v |\n", mibStr(a.BinaryBytes), a.Static)
			for _, im := range a.Idle {
				w("| idle resident memory (VmRSS), serving %s (%s module), %s after 20 inferences | %s |\n",
					im.Model, sizeStr(im.ModuleSize), idleSettle, mibStr(median(im.RSS)))
			}
		}
		if s := r.SimMemory; s != nil && s.Large > 0 {
			w("| memory per simulated device: simulator RSS / devices, at %d devices | %.0f KiB |\n", s.Large, float64(s.LargeRSS)/float64(s.Large)/1024)
			if s.Large > s.Small && s.SmallRSS > 0 {
				w("| memory per simulated device, marginal: (RSS at %d − RSS at %d) / %d | %.0f KiB |\n", s.Large, s.Small, s.Large-s.Small,
					float64(s.LargeRSS-s.SmallRSS)/float64(s.Large-s.Small)/1024)
			}
		}
		w("\n")
		if s := r.SimMemory; s != nil && len(s.Top) > 0 {
			w("Where a simulated device's memory goes (heap in use, `fleet sim --memprofile`, %d devices, each running one model):\n\n```\n%s\n```\n\n", s.Small, strings.Join(s.Top, "\n"))
		}
	}

	if p := r.Profile; p != nil {
		w("### Where the controller's time and memory go\n\n")
		w("One more embedded-broker run with %d devices, the controller under runtime/pprof (the same code as `fleet-controller`, "+
			"built into scripts/bench): CPU profiled from the fleet's join to the end of the run (rollout %s, controller CPU in the rollout %s%s), "+
			"heap in use at the end.\n\n", p.Devices, secs(p.Run.Rollout), secs(p.Run.RolloutCPU), errNote(p.Run.Err))
		if len(p.CPU) > 0 {
			w("CPU:\n\n```\n%s\n```\n\n", strings.Join(p.CPU, "\n"))
		}
		if len(p.Heap) > 0 {
			w("Heap in use:\n\n```\n%s\n```\n\n", strings.Join(p.Heap, "\n"))
		}
	}

	if p := r.IngestProfile; p != nil && len(p.CPU) > 0 {
		w("### Where the controller's time goes in telemetry ingest\n\n")
		w("The ingest phase once more on the embedded broker, the controller under runtime/pprof, CPU profiled over the phase (%.0f batches/s):\n\n```\n%s\n```\n\n",
			p.Rate, strings.Join(p.CPU, "\n"))
	}

	if len(r.Go) > 0 {
		w("### Go benchmarks\n\n`go test -run '^$' -bench . -benchmem -count N` over the repository; medians.\n\n")
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
