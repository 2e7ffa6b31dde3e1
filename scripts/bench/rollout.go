package main

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// rolloutWaves is the benchmark's strategy: four waves, zero soak, no
// gates, so the figures are the controller's and the fleet's own speed.
var rolloutWaves = []string{"25%", "50%", "75%", "100%"}

// rolloutRun is one run of the rollout benchmark.
type rolloutRun struct {
	Devices int
	// Join is how long the simulated fleet took to start and say hello.
	Join time.Duration
	// Assign is the assignment path: one model assigned to every device
	// at once, until every device runs it.
	Assign    time.Duration
	AssignCPU time.Duration
	// Rollout is POST /v1/rollouts until the rollout succeeded and every
	// device runs the new version; Engine is false when the controller
	// has no rollout API (then only the assignment path is measured).
	Engine     bool
	Phase      string
	Rollout    time.Duration
	RolloutCPU time.Duration
	// Decisions are, per wave after the first, the time from the last
	// device of the wave before counting as succeeded to the first device
	// of this wave being notified, as seen by polling every pollEvery.
	Decisions []time.Duration
	// Messages is the rate of MQTT PUBLISH packets the simulated devices
	// sent and received during the rollout.
	Messages float64
	// CtlIdle is the controller's resident memory with the fleet joined;
	// CtlPeak its peak resident memory over the whole run.
	CtlIdle, CtlPeak int64
	// SimRSS is the simulator's resident memory with every device running
	// the first model, idle.
	SimRSS int64
	// Err says why the run did not finish; its other figures are what
	// was measured until then.
	Err string
}

// rolloutResult is every run against one broker.
type rolloutResult struct {
	Broker string
	Runs   []rolloutRun
	// Fallback marks the runs with a smaller fleet, made because none
	// with the asked size finished; they are not judged against the
	// targets.
	Fallback bool
}

// pollEvery is how often the rollout's status is read.
const pollEvery = 50 * time.Millisecond

func (e *env) benchRollout(ctx context.Context, kind string, n int) (rolloutResult, error) {
	res := rolloutResult{Broker: kind}
	for run := range e.cfg.runs {
		r, err := e.rolloutRun(ctx, kind, n, false, nil)
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		if err != nil {
			// A run that does not finish is a result too: the report
			// says where it stopped.
			r.Err = err.Error()
			e.log.Error("rollout run failed", "broker", kind, "run", run+1, "err", err)
		}
		res.Runs = append(res.Runs, r)
		e.log.Info("rollout", "broker", kind, "run", run+1, "devices", n, "join", r.Join.Round(time.Millisecond),
			"assign", r.Assign.Round(time.Millisecond), "rollout", r.Rollout.Round(time.Millisecond), "phase", r.Phase,
			"decisions", r.Decisions, "ctl_cpu", r.RolloutCPU, "ctl_peak_mib", int(mib(r.CtlPeak)), "msgs_per_s", int(r.Messages))
	}
	return res, nil
}

// rolloutRun runs a fresh broker, controller and simulated fleet: the
// fleet joins, model 1.0.0 is assigned to all (the assignment path), then
// 2.0.0 is rolled out in four waves. With profiled, the controller runs
// under runtime/pprof, its CPU profiled from the join to the end of the
// run; then prof receives the directory holding the profiles.
func (e *env) rolloutRun(ctx context.Context, kind string, n int, profiled bool, prof func(dir string)) (rolloutRun, error) {
	r := rolloutRun{Devices: n}
	external := ""
	if kind == "mosquitto" {
		m, url, err := e.startMosquitto(ctx)
		if err != nil {
			return r, err
		}
		defer m.Kill()
		external = url
	}
	c, err := e.startController(ctx, external, profiled)
	if err != nil {
		return r, err
	}
	defer c.stop()
	if err := c.pushModels(ctx, e.models[benchModel+"@1.0.0"], e.models[benchModel+"@2.0.0"]); err != nil {
		return r, err
	}

	if profiled {
		// Profile from the join on: at scale the join is where the
		// controller works hardest. The heap profile is written at the
		// end, finished or not.
		_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR1)
		defer func() {
			_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR2)
			sleep(ctx, 3*time.Second)
			if prof != nil {
				prof(c.dir)
			}
		}()
	}
	start := time.Now()
	s, err := e.startSim(ctx, c, n, "--start-rate", fmt.Sprint(e.cfg.joinRate))
	if err != nil {
		return r, err
	}
	defer s.stop()
	joinTimeout := 2*time.Minute + time.Duration(n)*time.Millisecond
	if _, err := s.wait(ctx, joinTimeout, "every device to join", func(st simStatus) bool { return st.Joined == n }); err != nil {
		return r, err
	}
	r.Join = time.Since(start)
	if err := c.waitOnline(ctx, n, joinTimeout); err != nil {
		return r, err
	}
	r.CtlIdle, _, _ = memory(c.p.Pid())

	// The assignment path.
	cpu0, _ := cpuTime(c.p.Pid())
	t0 := time.Now()
	if _, err := c.client.Assign(ctx, client.Assignment{Model: benchModel, Version: "1.0.0", Selector: "fleet=bench"}); err != nil {
		return r, err
	}
	want1 := benchModel + "@1.0.0"
	if _, err := s.wait(ctx, 10*time.Minute, "every device to run "+want1, func(st simStatus) bool { return st.Running[want1] == n }); err != nil {
		return r, err
	}
	r.Assign = time.Since(t0)
	cpu1, _ := cpuTime(c.p.Pid())
	r.AssignCPU = cpu1 - cpu0
	// Let the fleet settle (acks, state reports) before the next step and
	// before reading the simulator's memory.
	sleep(ctx, 5*time.Second)
	r.SimRSS, _, _ = memory(s.pid())

	// The rollout.
	spec := map[string]any{
		"name": fmt.Sprintf("bench-%d", time.Now().UnixNano()%1_000_000), "selector": "fleet=bench", "model": benchModel + "@2.0.0",
		"strategy": map[string]any{"waves": rolloutWaves, "soak": "0s", "gates": []any{}},
	}
	msgs0 := s.status()
	cpu0, _ = cpuTime(c.p.Pid())
	t0 = time.Now()
	var created apiRollout
	code, err := c.call(ctx, http.MethodPost, "/v1/rollouts", spec, &created)
	if code == http.StatusNotFound || code == http.StatusMethodNotAllowed {
		_, r.CtlPeak, _ = memory(c.p.Pid())
		return r, nil // no rollout engine: the assignment path is the figure
	}
	if err != nil {
		return r, err
	}
	r.Engine = true
	st, decisions, err := c.followRollout(ctx, created.ID, 10*time.Minute)
	r.Phase = st.Phase
	if err != nil {
		return r, err
	}
	want2 := benchModel + "@2.0.0"
	final, err := s.wait(ctx, time.Minute, "every device to run "+want2, func(st simStatus) bool { return st.Running[want2] == n })
	if err != nil && r.Phase == "succeeded" {
		return r, err
	}
	r.Rollout = time.Since(t0)
	cpu1, _ = cpuTime(c.p.Pid())
	r.RolloutCPU = cpu1 - cpu0
	r.Decisions = decisions
	if dt := final.UpSeconds - msgs0.UpSeconds; dt > 0 {
		r.Messages = float64(final.Published+final.Received-msgs0.Published-msgs0.Received) / dt
	}
	_, r.CtlPeak, _ = memory(c.p.Pid())
	return r, nil
}

// waitOnline waits until the controller lists n online devices.
func (c *ctl) waitOnline(ctx context.Context, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		devs, err := c.client.Devices(ctx, "fleet=bench")
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
			return fmt.Errorf("the controller lists %d of %d devices online (%v)", online, n, err)
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
	} `json:"waves"`
}

// finishedSteps are the steps a device ends a wave in.
var finishedSteps = []string{"healthy", "failed", "timed-out", "skipped", "rolled-back"}

// followRollout polls a rollout until it ends and returns, for each wave
// after the first, the decision latency it saw.
func (c *ctl) followRollout(ctx context.Context, id string, timeout time.Duration) (apiRollout, []time.Duration, error) {
	var st apiRollout
	var allDone, started []time.Time
	deadline := time.Now().Add(timeout)
	for {
		if _, err := c.call(ctx, http.MethodGet, "/v1/rollouts/"+id, nil, &st); err != nil {
			return st, nil, err
		}
		now := time.Now()
		if allDone == nil {
			allDone, started = make([]time.Time, len(st.Waves)), make([]time.Time, len(st.Waves))
		}
		for i, w := range st.Waves {
			if i >= len(allDone) {
				break
			}
			done := 0
			for _, s := range finishedSteps {
				done += w.Steps[s]
			}
			if done >= w.Size && w.Size > 0 && allDone[i].IsZero() {
				allDone[i] = now
			}
			if started[i].IsZero() && (w.Steps["notified"] > 0 || w.State != "pending" && w.State != "waiting-approval") {
				started[i] = now
			}
		}
		switch st.Phase {
		case "succeeded", "aborted", "rolled-back":
			var dec []time.Duration
			for i := 1; i < len(started); i++ {
				if !allDone[i-1].IsZero() && !started[i].IsZero() {
					dec = append(dec, max(0, started[i].Sub(allDone[i-1])))
				}
			}
			if st.Phase != "succeeded" {
				return st, dec, fmt.Errorf("rollout %s ended %s: %s", id, st.Phase, st.Reason)
			}
			return st, dec, nil
		}
		if now.After(deadline) {
			return st, nil, fmt.Errorf("rollout %s still %s after %s (wave %v)", id, st.Phase, timeout, st.Waves)
		}
		sleep(ctx, pollEvery)
	}
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
	SmallRSS, LargeRSS int64    // median resident memory
	Top                []string // where the memory goes: heap profile top, at Small devices
}

// benchSimMemory reads the simulator's memory at the rollout benchmark's
// size (from its runs on the embedded broker) and at a tenth of it, whose
// heap it also profiles.
func (e *env) benchSimMemory(ctx context.Context, rollouts []rolloutResult) (*simMemory, error) {
	m := &simMemory{}
	// The largest fleet measured on the embedded broker, from the runs
	// that got as far as reading the simulator's memory.
	for _, r := range rollouts {
		var rss []int64
		devices := 0
		for _, run := range r.Runs {
			if run.SimRSS > 0 {
				devices = run.Devices
				rss = append(rss, run.SimRSS)
			}
		}
		if r.Broker == "embedded" && devices > m.Large {
			m.Large, m.LargeRSS = devices, median(rss)
		}
	}
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
	if err := c.waitOnline(ctx, m.Small, 2*time.Minute); err != nil {
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
	m.Top = pprofTop(ctx, prof, "inuse_space", 12)
	return m, nil
}

// pprofTop returns the top lines of `go tool pprof -top` for a profile.
func pprofTop(ctx context.Context, profile, index string, n int) []string {
	args := []string{"tool", "pprof", "-top", fmt.Sprintf("-nodecount=%d", n)}
	if index != "" {
		args = append(args, "-sample_index="+index)
	}
	out, err := exec.CommandContext(ctx, "go", append(args, profile)...).Output()
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
	Devices int
	Run     rolloutRun
	CPU     []string
	Heap    []string
}

// profileRollout runs the embedded-broker rollout once more with the
// controller under runtime/pprof.
func (e *env) profileRollout(ctx context.Context, n int) (*controllerProfile, error) {
	p := &controllerProfile{Devices: n}
	run, err := e.rolloutRun(ctx, "embedded", n, true, func(dir string) {
		p.CPU = pprofTop(ctx, filepath.Join(dir, "cpu.prof"), "", 20)
		p.Heap = pprofTop(ctx, filepath.Join(dir, "heap.prof"), "inuse_space", 15)
	})
	p.Run = run
	if err != nil {
		p.Run.Err = err.Error()
	}
	return p, nil
}
