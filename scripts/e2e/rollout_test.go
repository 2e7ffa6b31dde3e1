package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/fleet/sim"
	"github.com/edgefleet/edgefleet/models/examples/testmodels"
	"github.com/edgefleet/edgefleet/models/modeltest"
)

// The acceptance tests of staged rollouts (issue 3): the real
// fleet-controller binary with its embedded broker, and simulated devices
// that run the real agent code (fleet/sim), each running version 1.0.0 of
// a model when the rollout starts. The model is fraud-score (compiled
// XGBoost, 17 KB: hundreds of devices download it quickly), except where
// a test needs one of grid-anomaly's misbehaving variants.

// rolloutFleet is a controller, a simulated fleet, and model@1.0.0
// running on every online device.
type rolloutFleet struct {
	*fleet
	model  string
	sim    *sim.Sim
	stop   func()
	online []string
}

// bundleOf builds model at version: fraud-score from its XGBoost source,
// grid-anomaly (and its test variants) from Go.
func bundleOf(t *testing.T, model, version string) []byte {
	t.Helper()
	if model == "fraud-score" {
		return compiledModel(t, version)
	}
	return modeltest.BuildExample(t, model, version)
}

// startRolloutFleet starts the controller and n simulated devices with
// opts (Agents, Broker and Controller are filled in), pushes model 1.0.0
// plus the versions given, and installs 1.0.0 on every device with a
// plain assignment.
func startRolloutFleet(t *testing.T, n int, model string, opts sim.Options, versions ...string) *rolloutFleet {
	t.Helper()
	f := &rolloutFleet{fleet: startController(t, ""), model: model}
	simLog, err := os.Create(filepath.Join(f.dir, "sim.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(f.logTail("sim.log"))
		}
		simLog.Close()
	})
	opts.Agents, opts.Broker, opts.Controller = n, f.broker, f.api
	opts.AgentLogger = slog.New(slog.NewTextHandler(simLog, nil))
	if opts.MaxBackoff == 0 {
		opts.MaxBackoff = time.Second
	}
	if opts.RetryMin == 0 {
		opts.RetryMin = 200 * time.Millisecond
	}
	if opts.StateInterval == 0 {
		opts.StateInterval = time.Second
	}
	// These tests exercise rollouts, not signatures (TestSignedFleet and
	// TestKeyRotation do): devices check none.
	opts.AllowUnsigned = true
	if f.sim, err = sim.New(opts); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.sim.Run(ctx) }()
	f.stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sim: %v", err)
		}
	}
	t.Cleanup(f.stop)
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	if err := f.sim.WaitJoined(wctx); err != nil {
		t.Fatal(err)
	}
	for _, a := range f.sim.Agents() {
		if a.Online() {
			f.online = append(f.online, a.ID)
		}
	}
	// The simulator knows its hellos are sent; the controller may not have
	// stored them all yet, and the assignment below goes to the devices it
	// knows.
	f.eventually("the controller knows every device", time.Minute, func() (bool, string) {
		devs := f.byID("fleet=sim")
		return len(devs) == n, fmt.Sprintf("%d of %d devices known", len(devs), n)
	})
	for _, v := range append([]string{"1.0.0"}, versions...) {
		if _, err := f.client.PushModel(ctx, bundleOf(t, model, v)); err != nil {
			t.Fatalf("push %s@%s: %v", model, v, err)
		}
	}
	if _, err := f.client.Assign(ctx, client.Assignment{Model: model, Version: "1.0.0", Selector: "fleet=sim"}); err != nil {
		t.Fatal(err)
	}
	// Every device compiles 1.0.0 at once, on two cores the rest of the
	// package also loads: at load 33 forty compiles of grid-anomaly under
	// -race took longer than waitRunning's 90 s.
	f.eventually(model+"@1.0.0 active on every online device", 4*time.Minute, func() (bool, string) {
		devs := f.byID("fleet=sim")
		for _, id := range f.online {
			d := devs[id]
			if got := d.Active("default").String(); got != model+"@1.0.0" {
				return false, id + " runs " + got
			}
		}
		return true, ""
	})
	f.waitRunning(model+"@1.0.0", f.online...)
	return f
}

func simLabels(t *testing.T, spec string) sim.Labels {
	t.Helper()
	l, err := sim.ParseLabels(spec)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// waitRollout polls the rollout until cond holds. Callers give generous
// timeouts: with the whole e2e package running in parallel under -race on
// two cores, one wave of 10 simulated devices once took over 2 minutes to
// activate the Go-built test model.
func (f *rolloutFleet) waitRollout(id, what string, timeout time.Duration, cond func(*client.Rollout) bool) *client.Rollout {
	f.t.Helper()
	var r *client.Rollout
	f.eventually("rollout "+id+" "+what, timeout, func() (bool, string) {
		var err error
		if r, err = f.client.Rollout(context.Background(), id); err != nil {
			return false, err.Error()
		}
		return cond(r), fmt.Sprintf("%s %q wave %d steps %v", r.Phase, r.Reason, r.Wave, r.Steps)
	})
	return r
}

func (f *rolloutFleet) steps(id string) []client.RolloutDevice {
	f.t.Helper()
	ds, err := f.client.RolloutDevices(context.Background(), id, "", -1)
	if err != nil {
		f.t.Fatal(err)
	}
	return ds
}

func planOf(p *client.RolloutPlan) [][]string {
	var out [][]string
	for _, w := range p.Waves {
		out = append(out, slices.Sorted(slices.Values(w.Devices)))
	}
	return out
}

func membershipOf(steps []client.RolloutDevice, waves int) [][]string {
	out := make([][]string, waves)
	for _, d := range steps {
		if d.Wave < waves {
			out[d.Wave] = append(out[d.Wave], d.Device)
		}
	}
	for _, w := range out {
		sort.Strings(w)
	}
	return out
}

// fleetCmd runs the fleet binary and returns its exit code and output.
func (f *fleet) fleetCmd(timeout time.Duration, args ...string) (int, string, string) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "fleet"), args...)
	cmd.Env = append(os.Environ(), "EDGEFLEET_CONTROLLER="+f.api, "EDGEFLEET_TOKEN="+f.token)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, stdout.String(), stderr.String()
	case errors.As(err, &exit):
		return exit.ExitCode(), stdout.String(), stderr.String()
	}
	f.t.Fatalf("fleet %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	return 0, "", ""
}

// TestRollout200Healthy: 200 devices, waves 1%/10%/50%/100%, a healthy
// model: the rollout completes, every device runs the new version, and
// wave membership is identical when the same rollout is planned twice.
// `fleet rollout create -f` starts it and `fleet rollout watch` follows it
// to the end.
func TestRollout200Healthy(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startRolloutFleet(t, 200, "fraud-score", sim.Options{Labels: simLabels(t, "fleet=sim;site=s1..s8"), Seed: 3, Rate: 2}, "1.1.0")
	spec := filepath.Join(f.dir, "rollout.yaml")
	os.WriteFile(spec, []byte(`
name: fraud-1-1
selector: fleet=sim
model: fraud-score@1.1.0
strategy:
  waves: [1%, 10%, 50%, 100%]
  stratifyBy: site
  soak: 2s
  gates:
    - {type: errorRate, max: 0.05, minInferences: 5}
  failureBudget: 1%
  health: {maxErrorRate: 0.05, minInferences: 3}
`), 0o644)
	ctx := context.Background()
	specJSON := []byte(`{"name":"fraud-1-1","selector":"fleet=sim","model":"fraud-score@1.1.0","strategy":{"waves":["1%","10%","50%","100%"],"stratifyBy":"site"}}`)
	p1, err := f.client.PlanRolloutJSON(ctx, specJSON)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := f.client.PlanRolloutJSON(ctx, specJSON)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(planOf(p1), planOf(p2)) || p1.Targets != 200 {
		t.Fatalf("the same rollout planned twice gave different waves")
	}
	sizes := []int{}
	for _, w := range p1.Waves {
		sizes = append(sizes, len(w.Devices))
	}
	if !reflect.DeepEqual(sizes, []int{2, 18, 80, 100}) {
		t.Fatalf("wave sizes %v, want [2 18 80 100]", sizes)
	}

	if code, out, stderr := f.fleetCmd(30*time.Second, "rollout", "create", "-f", spec); code != 0 || !strings.Contains(out, "rollout fraud-1-1 created") {
		t.Fatalf("fleet rollout create: %d %s %s", code, out, stderr)
	}
	code, out, stderr := f.fleetCmd(4*time.Minute, "rollout", "watch", "fraud-1-1")
	if code != 0 {
		t.Fatalf("fleet rollout watch exited %d: %s\n%s\n%s", code, stderr, out, f.logTail("controller.log"))
	}
	for _, want := range []string{"SUCCEEDED", "wave 4", "[########################] 100/100", "gate errorRate", "PASS"} {
		if !strings.Contains(out, want) {
			t.Errorf("watch output lacks %q:\n%s", want, out)
		}
	}
	r, err := f.client.Rollout(ctx, "fraud-1-1")
	if err != nil {
		t.Fatal(err)
	}
	if r.Phase != "succeeded" || r.Steps["healthy"] != 200 || r.Failures != 0 {
		t.Fatalf("rollout = %+v", r)
	}
	if got := membershipOf(f.steps("fraud-1-1"), 4); !reflect.DeepEqual(got, planOf(p1)) {
		t.Fatalf("the waves run differ from the waves planned")
	}
	f.waitRunning("fraud-score@1.1.0", f.online...)
	for _, a := range f.sim.Agents() {
		if got := a.Active("default"); got != "fraud-score@1.1.0" {
			t.Fatalf("%s runs %q", a.ID, got)
		}
	}
}

// TestRolloutFlakyVersionRollsBack: a version that fails on 30% of inputs
// aborts the rollout in its first wave; every device of that wave runs
// the old version again, and no device outside it was ever touched.
func TestRolloutFlakyVersionRollsBack(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startRolloutFleet(t, 100, "fraud-score", sim.Options{Labels: simLabels(t, "fleet=sim"), Seed: 5, Rate: 10,
		Failing: 1, FailRate: 0.3, FailModel: "fraud-score@1.1.0"}, "1.1.0")
	ctx := context.Background()
	_, err := f.client.CreateRollout(ctx, client.RolloutSpec{Name: "flaky", Selector: "fleet=sim", Model: "fraud-score@1.1.0",
		Strategy: client.RolloutStrategy{
			Waves: []client.WaveSpec{{Size: "2%"}, {Size: "10%"}, {Size: "100%"}}, Soak: "3s",
			Gates:  []client.GateSpec{{Type: "errorRate", Max: 0.05, MinInferences: 10}},
			Health: &client.HealthSpec{MaxErrorRate: 0.05, MinInferences: 10},
		}})
	if err != nil {
		t.Fatal(err)
	}
	r := f.waitRollout("flaky", "rolled back", 4*time.Minute, func(r *client.Rollout) bool { return r.Phase == "rolled-back" })
	if r.Waves[0].State != "failed" || r.Waves[1].Steps["pending"] != r.Waves[1].Size || r.Failures == 0 {
		t.Fatalf("rollout = %+v", r)
	}
	t.Logf("reason: %s", r.Reason)
	var first []string
	for _, d := range f.steps("flaky") {
		switch {
		case d.Wave == 0:
			first = append(first, d.Device)
			if d.Step != "rolled-back" {
				t.Errorf("first-wave device %s is %s", d.Device, d.Step)
			}
		case d.Step != "pending":
			t.Errorf("device %s of wave %d was touched: %+v", d.Device, d.Wave+1, d)
		}
	}
	f.waitRunning("fraud-score@1.0.0", first...)
	// Outside the first wave, nothing ever named 1.1.0.
	devs := f.byID("fleet=sim")
	for id, d := range devs {
		if slices.Contains(first, id) {
			continue
		}
		for _, s := range d.Desired.Slots {
			if s.Version != "1.0.0" {
				t.Fatalf("device %s outside the first wave was sent %s", id, s.Version)
			}
		}
		for _, e := range d.LastEvents {
			if e.Version == "1.1.0" {
				t.Fatalf("device %s outside the first wave reported %s %s", id, e.Kind, e.Version)
			}
		}
	}
}

// TestRolloutSlowVersionStoppedByLatencyGate: a version with 3x the
// latency is stopped by the latency gate, with the figures shown by
// `fleet rollout get`.
//
// The gate compares the same minutes on both sides: 1.2.0-slow on the
// wave's devices from the minute after each activated, against 1.0.0 on
// the 30 devices outside the wave in those minutes, install minutes left
// out (controller/rollout/baseline.go). With a 4 s soak the wave's devices
// are done before that minute is in; the engine asks the gate again until
// it is, rather than pausing.
func TestRolloutSlowVersionStoppedByLatencyGate(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startRolloutFleet(t, 40, "grid-anomaly", sim.Options{Labels: simLabels(t, "fleet=sim"), Seed: 9, Rate: 20}, testmodels.Slow)
	ctx := context.Background()
	_, err := f.client.CreateRollout(ctx, client.RolloutSpec{Name: "slow", Selector: "fleet=sim", Model: "grid-anomaly@" + testmodels.Slow,
		Strategy: client.RolloutStrategy{
			Waves: []client.WaveSpec{{Size: "25%"}, {Size: "100%"}}, Soak: "4s", FailureBudget: "10%",
			Gates: []client.GateSpec{{Type: "latency", MaxP95Ratio: 1.5, MinInferences: 50}},
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			_, out, _ := f.fleetCmd(30*time.Second, "rollout", "get", "slow")
			t.Logf("fleet rollout get slow:\n%s", out)
		}
	})
	// Eight minutes, not four: the gate decides only in the first minute
	// after the wave's activations (up to 80 s more than before), and at
	// load 15 to 25 the wave's ten devices took up to 5m46s to activate.
	r := f.waitRollout("slow", "stopped", 8*time.Minute, func(r *client.Rollout) bool { return r.Finished() })
	// The first wave's gate is expected to fail, but one wave later still
	// counts: the simulated devices share two cores, and a minute in which
	// other devices compile the new module (minutes under -race) can slow
	// the devices outside the wave more than the slow version slows the
	// wave's (CI, 2026-11-27: wave 1 passed at p95 5.1 against 7.4 ms, wave 2
	// failed at 9.0 against 1.9 ms). Real devices do not share a CPU.
	// The latency gate must have stopped the version before the rollout
	// ended, and every device must be back.
	failed := -1
	for i, w := range r.Waves {
		if w.State == "failed" {
			failed = i
		}
	}
	if r.Phase != "rolled-back" || failed < 0 || !strings.Contains(r.Reason, "latency") {
		t.Fatalf("rollout = %+v", r)
	}
	if failed > 0 {
		t.Logf("the latency gate failed the version in wave %d, not the first (see above)", failed+1)
	}
	code, out, _ := f.fleetCmd(30*time.Second, "rollout", "get", "slow")
	if code != 0 || !strings.Contains(out, "gate latency") || !strings.Contains(out, "FAIL") || !strings.Contains(out, "p95Ratio=") ||
		!strings.Contains(out, "on 1.0.0") {
		t.Fatalf("fleet rollout get: %d\n%s", code, out)
	}
	t.Logf("%s", out)
}

// TestRolloutSameSpeedVersionPassesLatencyGate: the latency gate is not
// stopped by noise. grid-anomaly 1.1.0 is 1.0.0 recalibrated, the same
// work per call; under the same gate as the slow version's test, on a
// machine loaded by every other test, its first wave passes with a p95
// ratio near 1, and the rollout completes.
func TestRolloutSameSpeedVersionPassesLatencyGate(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startRolloutFleet(t, 40, "grid-anomaly", sim.Options{Labels: simLabels(t, "fleet=sim"), Seed: 11, Rate: 20}, "1.1.0")
	ctx := context.Background()
	latency := []client.GateSpec{{Type: "latency", MaxP95Ratio: 1.5, MinInferences: 50}}
	_, err := f.client.CreateRollout(ctx, client.RolloutSpec{Name: "same", Selector: "fleet=sim", Model: "grid-anomaly@1.1.0",
		Strategy: client.RolloutStrategy{
			Waves: []client.WaveSpec{{Size: "25%", Gates: latency}, {Size: "100%"}}, Soak: "4s", FailureBudget: "10%",
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			_, out, _ := f.fleetCmd(30*time.Second, "rollout", "get", "same")
			t.Logf("fleet rollout get same:\n%s", out)
		}
	})
	r := f.waitRollout("same", "finished", 8*time.Minute, func(r *client.Rollout) bool { return r.Finished() })
	var v client.GateVerdict
	for _, g := range r.Waves[0].Gates {
		if g.Gate == "latency" {
			v = g
		}
	}
	if r.Phase != "succeeded" || v.Result != "pass" || !strings.Contains(v.Detail, "outside the wave, same") {
		t.Fatalf("rollout %s %q; wave 1 latency verdict %+v", r.Phase, r.Reason, v)
	}
	t.Logf("wave 1: %s", v.Detail)
}

// TestRolloutOfflineDevices: 20% of the targets are offline; under each
// deadline policy the rollout finishes as configured.
func TestRolloutOfflineDevices(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startRolloutFleet(t, 50, "fraud-score", sim.Options{Labels: simLabels(t, "fleet=sim;grp=a,b"), Seed: 11, Rate: 2, Offline: 0.2}, "1.1.0")
	ctx := context.Background()
	offline := 0
	for _, a := range f.sim.Agents() {
		if !a.Online() {
			offline++
		}
	}
	if offline != 10 {
		t.Fatalf("%d devices offline, want 10", offline)
	}
	// skip: the offline devices are left out and the rollout succeeds.
	_, err := f.client.CreateRollout(ctx, client.RolloutSpec{Name: "skip", Selector: "fleet=sim,grp=a", Model: "fraud-score@1.1.0",
		Strategy: client.RolloutStrategy{Waves: []client.WaveSpec{{Size: "50%"}, {Size: "100%"}}, Soak: "1s", Deadline: "5s", Unreachable: "skip"}})
	if err != nil {
		t.Fatal(err)
	}
	// fail: they count against a budget big enough for them.
	_, err = f.client.CreateRollout(ctx, client.RolloutSpec{Name: "fail", Selector: "fleet=sim,grp=b", Model: "fraud-score@1.1.0",
		Strategy: client.RolloutStrategy{Waves: []client.WaveSpec{{Size: "100%"}}, Soak: "1s", Deadline: "5s", Unreachable: "fail", FailureBudget: "50%"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ id, step string }{{"skip", "skipped"}, {"fail", "timed-out"}} {
		r := f.waitRollout(c.id, "succeeded", 4*time.Minute, func(r *client.Rollout) bool { return r.Finished() })
		unreachable := 0
		for _, d := range f.steps(c.id) {
			if a := f.sim.Agent(d.Device); !a.Online() {
				unreachable++
				if d.Step != c.step {
					t.Errorf("%s: offline device %s is %s, want %s", c.id, d.Device, d.Step, c.step)
				}
			} else if d.Step != "healthy" {
				t.Errorf("%s: online device %s is %s", c.id, d.Device, d.Step)
			}
		}
		if r.Phase != "succeeded" || unreachable == 0 || r.Steps[c.step] != unreachable {
			t.Fatalf("%s: rollout %+v with %d unreachable", c.id, r, unreachable)
		}
	}
}

// TestRolloutApprovalWaits: the rollout waits before the gated wave until
// `fleet rollout approve`.
func TestRolloutApprovalWaits(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startRolloutFleet(t, 20, "fraud-score", sim.Options{Labels: simLabels(t, "fleet=sim"), Seed: 13, Rate: 2}, "1.1.0")
	ctx := context.Background()
	if code, out, stderr := f.fleetCmd(30*time.Second, "rollout", "create", "fraud-score@1.1.0", "-l", "fleet=sim", "--name", "gated",
		"--waves", "10%,100%", "--approve-before", "2", "--soak", "1s"); code != 0 {
		t.Fatalf("create: %d %s %s", code, out, stderr)
	}
	r := f.waitRollout("gated", "waiting for approval", time.Minute, func(r *client.Rollout) bool { return r.Phase == "waiting-approval" })
	time.Sleep(2 * time.Second)
	if r2, _ := f.client.Rollout(ctx, "gated"); r2.Revision != r.Revision || r2.Waves[1].Steps["pending"] != 18 {
		t.Fatalf("the rollout moved while waiting for approval: %+v", r2)
	}
	if code, out, stderr := f.fleetCmd(30*time.Second, "rollout", "approve", "gated"); code != 0 || !strings.Contains(out, "running") {
		t.Fatalf("approve: %d %s %s", code, out, stderr)
	}
	f.waitRollout("gated", "succeeded", 4*time.Minute, func(r *client.Rollout) bool { return r.Phase == "succeeded" })
}

// TestRolloutControllerSIGKILL kills the controller with SIGKILL at 10
// random moments of a rollout and restarts it each time: the rollout
// completes with the same final state as an uninterrupted run.
func TestRolloutControllerSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	type final struct {
		Phase  string
		Steps  map[string]int
		Waves  [][]string
		Active map[string]string
	}
	run := func(t *testing.T, kills int) final {
		f := startRolloutFleet(t, 40, "fraud-score", sim.Options{Labels: simLabels(t, "fleet=sim"), Seed: 17, Rate: 2}, "1.1.0")
		ctx := context.Background()
		_, err := f.client.CreateRollout(ctx, client.RolloutSpec{Name: "kill9", Selector: "fleet=sim", Model: "fraud-score@1.1.0",
			Strategy: client.RolloutStrategy{Waves: []client.WaveSpec{{Size: "10%"}, {Size: "30%"}, {Size: "60%"}, {Size: "100%"}},
				Soak: "1s", MaxConcurrentDownloads: 8}})
		if err != nil {
			t.Fatal(err)
		}
		seed := uint64(time.Now().UnixNano())
		rng := rand.New(rand.NewPCG(seed, 0))
		if kills > 0 {
			t.Logf("kill moments from seed %d", seed)
		}
		for i := range kills {
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
			if r, err := f.client.Rollout(ctx, "kill9"); err == nil {
				t.Logf("SIGKILL %d: rollout %s, wave %d, steps %v", i+1, r.Phase, r.Wave, r.Steps)
			}
			f.restartController()
		}
		r := f.waitRollout("kill9", "finished", 3*time.Minute, func(r *client.Rollout) bool { return r.Finished() })
		f.waitRunning("fraud-score@1.1.0", f.online...)
		out := final{Phase: r.Phase, Steps: r.Steps, Waves: membershipOf(f.steps("kill9"), len(r.Waves)), Active: map[string]string{}}
		for id, d := range f.byID("fleet=sim") {
			out.Active[id] = d.Active("default").String()
		}
		return out
	}
	var want final
	t.Run("uninterrupted", func(t *testing.T) { want = run(t, 0) })
	got := run(t, 10)
	if want.Phase != "succeeded" || !reflect.DeepEqual(got, want) {
		t.Fatalf("after 10 kills: %+v\nuninterrupted: %+v", got, want)
	}
}
