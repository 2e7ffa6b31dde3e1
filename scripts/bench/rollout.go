package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// rolloutWaves is the benchmark's strategy: four waves, zero soak, no
// gates, so the figures are the controller's and the fleet's own speed.
var rolloutWaves = []string{"25%", "50%", "75%", "100%"}

// rolloutResult is the rollout benchmark against one broker: one fleet
// joins one controller, gets its first model by an install rollout, then
// goes through the measured upgrade rollouts, one per run.
type rolloutResult struct {
	Broker  string
	Devices int
	// Fallback marks a smaller fleet, run because no run with the asked
	// size finished; it is not judged against the targets.
	Fallback bool
	// Join is how long the fleet took to start and be listed online by
	// the controller (the bench paces it, see joinFleet).
	Join time.Duration
	// Install is the first rollout, 1.0.0 onto the fresh fleet in the
	// same four waves: every device downloads, verifies, compiles and
	// loads a model for the first time.
	Install rolloutRun
	// Runs are the measured rollouts: version k+1 replacing version k.
	Runs []rolloutRun
	// Assign is the assignment path (with -assign): a further version
	// assigned to every device at once (no waves, no download cap), until
	// every device runs it; AssignErr says why it did not finish.
	Assign, AssignCPU time.Duration
	AssignErr         string
	// CtlIdle is the controller's resident memory with the fleet joined;
	// CtlPeak its peak resident memory over the whole session (join
	// included).
	CtlIdle, CtlPeak int64
	// SimRSS is the simulators' resident memory with every device running
	// 1.0.0, idle.
	SimRSS int64
	// Dropped counts the messages the embedded broker dropped for the
	// controller's own session, over its in-flight limit (mochi logs
	// each): device messages the controller never saw.
	Dropped int
	// Err says why the session stopped early; the figures are what was
	// measured until then.
	Err string
	// Profile is the profiled rollout run after the measured ones, when
	// the session made one (see rolloutSession); results.Profile keeps it.
	Profile *controllerProfile `json:"-"`
}

// rolloutRun is one rollout of the benchmark.
type rolloutRun struct {
	Version string
	Phase   string
	// Rollout runs from POST /v1/rollouts until the rollout succeeded and
	// every device reports the new version active; RolloutCPU is the
	// controller's CPU time over the same span.
	Rollout    time.Duration
	RolloutCPU time.Duration
	// SimCPU is the simulators' CPU time over the same span (user+system,
	// every process): on a machine that runs both, the controller's
	// rival for the cores.
	SimCPU time.Duration
	// Decisions are, per wave, the decision latency the controller
	// recorded (the wave's decisionMs in the API): from receiving the
	// report that finished the wave's last device to storing the next
	// wave's start (or the rollout's end) and publishing its first desired
	// states.
	Decisions []time.Duration
	// Messages is the rate of MQTT PUBLISH packets the simulated devices
	// sent and received during the rollout.
	Messages float64
	// Done is how many devices ran the new version when the bench stopped
	// waiting: all of them, unless the rollout did not finish.
	Done int
	// Err says why the rollout did not finish.
	Err string
}

// pollEvery is how often the rollout's status is read while it runs.
// Each read costs the controller a query over every device step of the
// rollout (10,000 rows at 10,000 devices): read twenty times a second
// through a whole rollout, that was 18 % of the controller's CPU, load
// the benchmark put on what it measures. The decision latency is the
// controller's own figure, so reading often buys nothing.
const pollEvery = 250 * time.Millisecond

// versions are the benchmark model's versions a session uses: 1.0.0 to
// install, one more per run, one more for the profiled run, one more for
// the assignment path.
func (c config) versions() []string {
	var v []string
	for i := range c.runs + 3 {
		v = append(v, fmt.Sprintf("%d.0.0", i+1))
	}
	return v
}

// benchRollout runs one session against a fresh broker and controller.
func (e *env) benchRollout(ctx context.Context, kind string, n int, profile bool) rolloutResult {
	var prof func(dir string, sims []string)
	if profile {
		prof = func(string, []string) {}
	}
	res, err := e.rolloutSession(ctx, kind, n, false, prof)
	if err != nil {
		// A session that does not finish is a result too: the report
		// says where it stopped.
		res.Err = err.Error()
		e.log.Error("rollout session stopped", "broker", kind, "devices", n, "err", err)
	}
	return res
}

// rolloutSession runs a fresh broker, controller and simulated fleet: the
// fleet joins, 1.0.0 is installed by a rollout, then each run rolls out
// the next version, and with -assign one more version is assigned to
// every device at once (the assignment path). With profiled, the
// controller runs under runtime/pprof, its CPU profiled from the join to
// the end of the session; then prof receives the directory holding the
// profiles. Without profiled but with prof, the controller runs under
// the same wrapper but unprofiled, the simulators under --cpuprofile, and
// when a measured run missed the target (or -profile), the session rolls
// out one more version, not measured, with the controller's CPU profiled
// over just that rollout (r.Profile): where the time goes, without a
// session of its own (a join and an install) and without the profiler in
// the measured runs.
func (e *env) rolloutSession(ctx context.Context, kind string, n int, profiled bool, prof func(dir string, sims []string)) (r rolloutResult, err error) {
	extra := !profiled && prof != nil
	r.Broker, r.Devices = kind, n
	external := ""
	if kind == "mosquitto" {
		m, url, err := e.startMosquitto(ctx)
		if err != nil {
			return r, err
		}
		defer m.Kill()
		external = url
	}
	c, err := e.startController(ctx, external, profiled || extra)
	if err != nil {
		return r, err
	}
	defer c.stop()
	defer func() {
		_, r.CtlPeak, _ = memory(c.p.Pid())
		r.Dropped = countLines(c.p.Log, "client store quota reached")
	}()
	var bundles [][]byte
	for _, v := range e.cfg.versions() {
		bundles = append(bundles, e.models[benchModel+"@"+v])
	}
	if err := c.pushModels(ctx, bundles...); err != nil {
		return r, err
	}
	// simProfiles are the simulators' CPU profiles, written when they
	// stop (before the deferred function below runs).
	var simProfiles []string
	if profiled {
		// Profile from the join on: at scale the join is where the
		// controller works hardest. The heap profile is written at the
		// end.
		_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR1)
		defer func() {
			_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR2)
			sleep(ctx, 3*time.Second)
			if prof != nil {
				prof(c.dir, simProfiles)
			}
		}()
	}

	start := time.Now()
	s, err := e.joinFleet(ctx, c, n, profiled || extra)
	if s != nil {
		simProfiles = s.cpuProfiles
	}
	if s != nil {
		defer s.stop()
	}
	if err != nil {
		return r, fmt.Errorf("join: %w", err)
	}
	r.Join = time.Since(start)
	r.CtlIdle, _, _ = memory(c.p.Pid())
	e.log.Info("fleet joined", "broker", kind, "devices", n, "took", r.Join.Round(time.Millisecond), "ctl_rss_mib", int(mib(r.CtlIdle)))

	versions := e.cfg.versions()
	r.Install = e.rollout(ctx, c, s, n, versions[0])
	e.log.Info("install rollout", "broker", kind, "version", versions[0], "took", r.Install.Rollout.Round(time.Millisecond), "phase", r.Install.Phase)
	if r.Install.Err != "" {
		return r, fmt.Errorf("install rollout: %s", r.Install.Err)
	}
	// Let the fleet settle (acks, state reports) before measuring and
	// before reading the simulators' memory.
	sleep(ctx, 5*time.Second)
	r.SimRSS = s.memory()
	for i := range e.cfg.runs {
		x := e.rollout(ctx, c, s, n, versions[i+1])
		r.Runs = append(r.Runs, x)
		e.log.Info("rollout", "broker", kind, "run", i+1, "version", x.Version, "devices", n, "took", x.Rollout.Round(time.Millisecond),
			"phase", x.Phase, "decisions", x.Decisions, "ctl_cpu", x.RolloutCPU, "sim_cpu", x.SimCPU, "msgs_per_s", int(x.Messages), "err", x.Err)
		if ctx.Err() != nil {
			return r, ctx.Err()
		}
		if x.Err != "" {
			// A rollout that did not finish (in -rollout-timeout) leaves
			// the fleet mid-way; the next would not start from the same
			// place, nor fare better.
			return r, fmt.Errorf("rollout of %s did not finish; the session stops", x.Version)
		}
		sleep(ctx, 3*time.Second)
	}
	if e.cfg.assign {
		e.assignAll(ctx, c, s, n, versions[len(versions)-1], &r)
	}
	if extra && (e.cfg.profile || slices.ContainsFunc(r.Runs, func(x rolloutRun) bool { return x.Rollout > targetRollout })) {
		r.Profile = e.profileRun(ctx, c, s, n, versions[e.cfg.runs+1], r)
	}
	return r, nil
}

// profileRun rolls version out once more, not measured, with the
// controller's CPU profiled over that rollout, then stops the simulators
// so they write their CPU profiles (which cover their whole session).
func (e *env) profileRun(ctx context.Context, c *ctl, s *simFleet, n int, version string, r rolloutResult) *controllerProfile {
	e.log.Info("profiling the controller through one more rollout", "broker", r.Broker, "devices", n, "version", version)
	p := &controllerProfile{Broker: r.Broker, Devices: n, InSession: true}
	_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR1)
	x := e.rollout(ctx, c, s, n, version)
	_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR2)
	e.log.Info("profiled rollout", "broker", r.Broker, "version", version, "took", x.Rollout.Round(time.Millisecond), "ctl_cpu", x.RolloutCPU, "sim_cpu", x.SimCPU, "err", x.Err)
	p.Session = r
	p.Session.Runs = []rolloutRun{x}
	_, p.Session.CtlPeak, _ = memory(c.p.Pid())
	sleep(ctx, 3*time.Second) // the heap profile is written on SIGUSR2
	p.CPU = pprofTop(ctx, filepath.Join(c.dir, "cpu.prof"), "", 30, true)
	p.Heap = pprofTop(ctx, filepath.Join(c.dir, "heap.prof"), "inuse_space", 15, false)
	s.stop()
	if len(s.cpuProfiles) > 0 {
		p.SimCPU = pprofTop(ctx, s.cpuProfiles[0], "", 30, true, s.cpuProfiles[1:]...)
	}
	return p
}

// rollout rolls version out to the fleet in the benchmark's four waves
// and waits until every device runs it.
func (e *env) rollout(ctx context.Context, c *ctl, s *simFleet, n int, version string) rolloutRun {
	f := rolloutRun{Version: version}
	spec := map[string]any{
		"name":     fmt.Sprintf("bench-%s-%d", strings.ReplaceAll(version, ".", "-"), time.Now().UnixNano()%1_000_000),
		"selector": "fleet=bench", "model": benchModel + "@" + version,
		"strategy": map[string]any{"waves": rolloutWaves, "soak": "0s", "gates": []any{}},
	}
	msgs0, t0 := s.status(), time.Now()
	cpu0, _ := cpuTime(c.p.Pid())
	simCPU0 := s.cpu()
	var created apiRollout
	if _, err := c.call(ctx, http.MethodPost, "/v1/rollouts", spec, &created); err != nil {
		f.Err = err.Error()
		return f
	}
	want := benchModel + "@" + version
	st, err := c.followRollout(ctx, created.ID, e.cfg.rolloutTimeout)
	f.Phase = st.Phase
	if err == nil {
		_, err = s.wait(ctx, time.Minute, "every device to run "+want, func(st simStatus) bool { return st.Running[want] == n })
	}
	t1 := time.Now()
	f.Rollout = t1.Sub(t0)
	cpu1, _ := cpuTime(c.p.Pid())
	f.RolloutCPU = cpu1 - cpu0
	f.SimCPU = s.cpu() - simCPU0
	final := s.status()
	f.Done = final.Running[want]
	f.Messages = float64(final.Published+final.Received-msgs0.Published-msgs0.Received) / t1.Sub(t0).Seconds()
	if err == nil {
		f.Decisions, err = c.decisions(ctx, created.ID)
	}
	if err != nil {
		f.Err = err.Error()
	}
	return f
}

// assignAll measures the assignment path: version assigned to every
// device at once. It does not fail the session: at scale it is where the
// controller's limits show first, and the report says so.
func (e *env) assignAll(ctx context.Context, c *ctl, s *simFleet, n int, version string, r *rolloutResult) {
	cpu0, _ := cpuTime(c.p.Pid())
	t0 := time.Now()
	want := benchModel + "@" + version
	_, err := c.client.Assign(ctx, client.Assignment{Model: benchModel, Version: version, Selector: "fleet=bench"})
	if err == nil {
		_, err = s.wait(ctx, 5*time.Minute, "every device to run "+want, func(st simStatus) bool { return st.Running[want] == n })
	}
	r.Assign = time.Since(t0)
	cpu1, _ := cpuTime(c.p.Pid())
	r.AssignCPU = cpu1 - cpu0
	if err != nil {
		r.AssignErr = err.Error()
		e.log.Warn("assignment path did not finish", "devices", n, "err", err)
	}
}

// waitOnline waits until the controller lists n online devices matching
// selector.
func (c *ctl) waitOnline(ctx context.Context, selector string, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		devs, err := c.client.Devices(ctx, selector)
		online := 0
		for _, d := range devs {
			if d.Online {
				online++
			}
		}
		if err == nil && online == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s the controller lists %d of %d devices (%s) online (%v); its broker may have dropped their hellos (see its log)",
				timeout, online, n, selector, err)
		}
		sleep(ctx, time.Second)
	}
}

// apiRollout is the part of the controller's rollout JSON the benchmark
// reads.
type apiRollout struct {
	ID     string `json:"id"`
	Phase  string `json:"phase"`
	Reason string `json:"reason"`
	Waves  []struct {
		Index  int            `json:"index"`
		Size   int            `json:"size"`
		State  string         `json:"state"`
		Steps  map[string]int `json:"steps"`
		Failed int            `json:"failed"`
		// DecisionMs is the controller's own measure of the wave's
		// decision latency, set once it is made.
		DecisionMs *float64 `json:"decisionMs"`
	} `json:"waves"`
}

// finishedSteps are the steps a device ends a wave in.
var finishedSteps = []string{"healthy", "failed", "timed-out", "skipped", "rolled-back"}

// followRollout reads a rollout every pollEvery until it ends.
func (c *ctl) followRollout(ctx context.Context, id string, timeout time.Duration) (apiRollout, error) {
	var st apiRollout
	deadline := time.Now().Add(timeout)
	for {
		if _, err := c.call(ctx, http.MethodGet, "/v1/rollouts/"+id, nil, &st); err != nil {
			return st, err
		}
		switch st.Phase {
		case "succeeded":
			return st, nil
		case "aborted", "rolled-back":
			return st, fmt.Errorf("rollout %s ended %s: %s", id, st.Phase, st.Reason)
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("rollout %s still %s after %s (wave %v)", id, st.Phase, timeout, st.Waves)
		}
		sleep(ctx, pollEvery)
	}
}

// decisions reads the wave decision latencies the controller recorded
// for rollout id (every wave's: to the next wave's start, and the last
// one's to the rollout's end).
func (c *ctl) decisions(ctx context.Context, id string) ([]time.Duration, error) {
	var st apiRollout
	if _, err := c.call(ctx, http.MethodGet, "/v1/rollouts/"+id, nil, &st); err != nil {
		return nil, err
	}
	var out []time.Duration
	for _, w := range st.Waves {
		if w.DecisionMs == nil {
			return out, fmt.Errorf("rollout %s: the controller recorded no decision latency for wave %d", id, w.Index+1)
		}
		out = append(out, time.Duration(*w.DecisionMs*float64(time.Millisecond)))
	}
	return out, nil
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// simMemory is the simulator's resident memory at two fleet sizes.
type simMemory struct {
	Small, Large       int      // devices
	LargeProcs         int      // fleet sim processes of the Large fleet (Small is one)
	SmallRSS, LargeRSS int64    // resident memory, all processes
	Top                []string // where the memory goes: heap profile top, at Small devices
}

// benchSimMemory reads the simulator's memory at the rollout benchmark's
// size (from its session on the embedded broker) and at a tenth of it, in
// one process, whose heap it also profiles.
func (e *env) benchSimMemory(ctx context.Context, rollouts []rolloutResult) (*simMemory, error) {
	m := &simMemory{}
	// The largest fleet measured on the embedded broker, from the runs
	// that got as far as reading the simulator's memory.
	for _, r := range rollouts {
		if r.Broker == "embedded" && r.SimRSS > 0 && r.Devices > m.Large {
			m.Large, m.LargeRSS = r.Devices, r.SimRSS
		}
	}
	m.LargeProcs = (m.Large + e.cfg.simDevices - 1) / e.cfg.simDevices
	m.Small = max(1, m.Large/10)
	c, err := e.startController(ctx, "", false)
	if err != nil {
		return nil, err
	}
	defer c.stop()
	if err := c.pushModels(ctx, e.models[benchModel+"@1.0.0"]); err != nil {
		return nil, err
	}
	prof := filepath.Join(e.dir("simprofile"), "heap.prof")
	s, err := e.startSim(ctx, c, m.Small, "--memprofile", prof, "--every", "2s")
	if err != nil {
		return nil, err
	}
	defer s.stop()
	if _, err := s.wait(ctx, 5*time.Minute, "every device to join", func(st simStatus) bool { return st.Joined == m.Small }); err != nil {
		return nil, err
	}
	if err := c.waitOnline(ctx, "fleet=bench", m.Small, 2*time.Minute); err != nil {
		return nil, err
	}
	if _, err := c.client.Assign(ctx, client.Assignment{Model: benchModel, Version: "1.0.0", Selector: "fleet=bench"}); err != nil {
		return nil, err
	}
	want := benchModel + "@1.0.0"
	if _, err := s.wait(ctx, 5*time.Minute, "every device to run "+want, func(st simStatus) bool { return st.Running[want] == m.Small }); err != nil {
		return nil, err
	}
	sleep(ctx, 5*time.Second)
	m.SmallRSS, _, err = memory(s.pid())
	if err != nil {
		return nil, err
	}
	m.Top = pprofTop(ctx, prof, "inuse_space", 12, false)
	return m, nil
}

// pprofTop returns the top lines of `go tool pprof -top` for a profile,
// sorted by cumulative share with cum (where the time goes, call chains
// included) or by own share.
func pprofTop(ctx context.Context, profile, index string, n int, cum bool, more ...string) []string {
	args := []string{"tool", "pprof", "-top", fmt.Sprintf("-nodecount=%d", n)}
	if cum {
		args = append(args, "-cum")
	}
	if index != "" {
		args = append(args, "-sample_index="+index)
	}
	args = append(append(args, profile), more...)
	out, err := exec.CommandContext(ctx, "go", args...).Output()
	if err != nil {
		return []string{fmt.Sprintf("(go tool pprof %s: %v)", profile, err)}
	}
	var lines []string
	body := false
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "flat") {
			body = true
		}
		if body && strings.TrimSpace(l) != "" {
			lines = append(lines, l)
		}
		if strings.HasPrefix(l, "Showing nodes") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return lines
}

// controllerProfile is where a profiled rollout spent the controller's
// CPU and what its heap held at the end.
type controllerProfile struct {
	Broker  string
	Devices int
	// InSession says the profile is of one more rollout in a measured
	// session (profileRun), not of a session of its own (profileRollout).
	InSession bool
	Session   rolloutResult
	CPU       []string
	Heap      []string
	// SimCPU is where the simulators' CPU went over the same session
	// (every process's profile, merged).
	SimCPU []string
}

// profileRollout runs a session once more on broker kind, with one
// measured rollout (-runs with -profile-only), the controller under
// runtime/pprof and the simulators under --cpuprofile.
func (e *env) profileRollout(ctx context.Context, kind string, n int) *controllerProfile {
	p := &controllerProfile{Broker: kind, Devices: n}
	cfg := e.cfg
	if !cfg.profileOnly {
		e.cfg.runs = 1
	}
	defer func() { e.cfg = cfg }()
	res, err := e.rolloutSession(ctx, kind, n, true, func(dir string, sims []string) {
		p.CPU = pprofTop(ctx, filepath.Join(dir, "cpu.prof"), "", 30, true)
		p.Heap = pprofTop(ctx, filepath.Join(dir, "heap.prof"), "inuse_space", 15, false)
		if len(sims) > 0 {
			p.SimCPU = pprofTop(ctx, sims[0], "", 30, true, sims[1:]...)
		}
	})
	p.Session = res
	if err != nil {
		p.Session.Err = err.Error()
	}
	return p
}

// countLines counts the lines of a log file holding substr; 0 when the
// file cannot be read.
func countLines(path, substr string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if strings.Contains(sc.Text(), substr) {
			n++
		}
	}
	return n
}
