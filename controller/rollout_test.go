package controller

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/api"
	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	"github.com/edgefleet/edgefleet/controller/rollout"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// rolloutWait bounds the wait for a rollout to reach a state; the waves
// of these tests soak for a fraction of a second, but the latency gate
// judges only minutes after the one a wave's devices activated in, so
// its case waits for the next minute.
const rolloutWait = 90 * time.Second

// fastRollouts are engine timings for tests.
var fastRollouts = &rollout.Options{GateInterval: 50 * time.Millisecond, MaxSleep: 100 * time.Millisecond, RestartGrace: time.Second}

// rolloutFleet is a controller with models m@1.0.0 and m@2.0.0 stored and
// fake agents running m@1.0.0.
type rolloutFleet struct {
	*harness
	digests map[string]string // version -> digest
	agents  map[string]*testdevice.Agent
}

func startRolloutFleet(t *testing.T) *rolloutFleet {
	t.Helper()
	h := start(t, t.TempDir(), func(c *Config) { c.rolloutTuning = fastRollouts })
	f := &rolloutFleet{harness: h, digests: map[string]string{}, agents: map[string]*testdevice.Agent{}}
	for _, v := range []string{"1.0.0", "2.0.0"} {
		b := makeBundle(t, "m", v, []byte("module "+v))
		h.call("POST", "/v1/models", encode(t, b), http.StatusCreated, nil)
		f.digests[v] = b.Digest
	}
	return f
}

func (f *rolloutFleet) ref(v string) *pb.ModelRef { return ref("m", v, f.digests[v]) }

// addAgents starts n agents named prefix-000... running m@1.0.0, labelled
// by labels(i), and waits until the controller knows them all.
func (f *rolloutFleet) addAgents(n int, prefix string, labels func(i int) map[string]string, beh map[string]testdevice.Behavior) []*testdevice.Agent {
	f.t.Helper()
	out := make([]*testdevice.Agent, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			out[i] = testdevice.StartAgent(f.t, f.mqtt, fmt.Sprintf("%s-%03d", prefix, i), labels(i), f.ref("1.0.0"), beh)
		})
	}
	wg.Wait()
	for _, a := range out {
		f.agents[a.ID] = a
	}
	f.waitKnown(out)
	return out
}

// waitKnown waits until the controller has the state of every agent and
// sees it online.
func (f *rolloutFleet) waitKnown(agents []*testdevice.Agent) {
	f.t.Helper()
	testdevice.Eventually(f.t, func() (bool, string) {
		var l api.DeviceList
		f.call("GET", "/v1/devices", nil, http.StatusOK, &l)
		ready := map[string]bool{}
		for _, d := range l.Devices {
			ready[d.ID] = d.Online && len(d.Slots) > 0
		}
		for _, a := range agents {
			if !ready[a.ID] {
				return false, a.ID + " not reported yet"
			}
		}
		return true, ""
	})
}

func (f *rolloutFleet) createRollout(spec string) api.Rollout {
	f.t.Helper()
	var r api.Rollout
	f.call("POST", "/v1/rollouts", []byte(spec), http.StatusCreated, &r)
	return r
}

func (f *rolloutFleet) rollout(id string) api.Rollout {
	f.t.Helper()
	var r api.Rollout
	f.call("GET", "/v1/rollouts/"+id, nil, http.StatusOK, &r)
	return r
}

func (f *rolloutFleet) act(id, action string) api.Rollout {
	f.t.Helper()
	var r api.Rollout
	f.call("POST", "/v1/rollouts/"+id+"/"+action, nil, http.StatusOK, &r)
	return r
}

func (f *rolloutFleet) rolloutDevices(id, query string) []api.RolloutDevice {
	f.t.Helper()
	var l api.RolloutDeviceList
	f.call("GET", "/v1/rollouts/"+id+"/devices"+query, nil, http.StatusOK, &l)
	return l.Devices
}

// waitRollout polls the rollout until cond holds.
func (f *rolloutFleet) waitRollout(id, what string, cond func(api.Rollout) bool) api.Rollout {
	f.t.Helper()
	deadline := time.Now().Add(rolloutWait)
	var r api.Rollout
	for time.Now().Before(deadline) {
		r = f.rollout(id)
		if cond(r) {
			return r
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	f.t.Fatalf("rollout %s: not %s within %s:\n%s", id, what, rolloutWait, b)
	return r
}

func (f *rolloutFleet) waitPhase(id string, phase rollout.Phase) api.Rollout {
	f.t.Helper()
	return f.waitRollout(id, "phase "+string(phase), func(r api.Rollout) bool { return r.Phase == string(phase) })
}

func membership(devs []api.RolloutDevice) [][]string {
	var out [][]string
	for _, d := range devs {
		for len(out) <= d.Wave {
			out = append(out, nil)
		}
		out[d.Wave] = append(out[d.Wave], d.Device)
	}
	return out
}

func all(i int) map[string]string { return map[string]string{"fleet": "a"} }

// watchEvents reads the rollout's event stream until the test ends and
// hands every Rollout document to check.
func (f *rolloutFleet) watchEvents(id string, check func(api.Rollout)) (stop func() int) {
	f.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", f.base+"/v1/rollouts/"+id+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+f.adminToken())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != http.StatusOK || ct != "text/event-stream" {
		f.t.Fatalf("events: %d %s", resp.StatusCode, ct)
	}
	var mu sync.Mutex
	n := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			data, ok := strings.CutPrefix(sc.Text(), "data: ")
			if !ok {
				continue
			}
			var r api.Rollout
			if err := json.Unmarshal([]byte(data), &r); err != nil {
				f.t.Errorf("event is not a Rollout: %v: %s", err, data)
				return
			}
			mu.Lock()
			n++
			mu.Unlock()
			check(r)
		}
	}()
	return func() int {
		cancel()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return n
	}
}

// TestRolloutHealthyWaves runs a four-wave rollout over healthy agents:
// waves hold 1%, 10%, 50% and 100% of the fleet (cumulative), a wave
// starts only once the one before passed, every device ends on the new
// version, and planning the same rollout twice gives the same waves.
func TestRolloutHealthyWaves(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(20, "pos", all, nil)
	spec := `{"name":"r1","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["1%","10%","50%","100%"],"soak":"150ms","failureBudget":0,
		"health":{"maxErrorRate":0.1,"maxLatencyP99":"250ms","minInferences":5}}}`

	// Planned twice (dry runs), the waves are the same.
	var p1, p2 api.RolloutPlan
	f.call("POST", "/v1/rollouts?dryRun=true", []byte(spec), http.StatusOK, &p1)
	f.call("POST", "/v1/rollouts?dryRun=true", []byte(spec), http.StatusOK, &p2)
	if !reflect.DeepEqual(p1, p2) || p1.ID != "r1" || p1.Targets != 20 {
		t.Fatalf("plans differ or are wrong:\n%+v\n%+v", p1, p2)
	}
	var sizes []int
	for _, w := range p1.Waves {
		sizes = append(sizes, len(w.Devices))
	}
	// 1% of 20 is one device, 10% two: each wave takes at least one more.
	if !reflect.DeepEqual(sizes, []int{1, 1, 8, 10}) {
		t.Fatalf("wave sizes = %v, want [1 1 8 10]", sizes)
	}
	if _, err := f.c.store.Rollout(context.Background(), "r1"); err == nil {
		t.Fatal("a dry run stored the rollout")
	}

	r := f.createRollout(spec)
	if r.ID != "r1" || r.Targets != 20 || len(r.Waves) != 4 || r.Spec.Strategy.Deadline.D() != rollout.DefaultDeadline {
		t.Fatalf("created rollout = %+v", r)
	}
	// The stream's every picture: waves after the current one are
	// untouched, and the counts add up.
	var violations []string
	var vmu sync.Mutex
	stop := f.watchEvents("r1", func(r api.Rollout) {
		for _, w := range r.Waves {
			total := 0
			for _, n := range w.Steps {
				total += n
			}
			bad := total != w.Size
			if w.Index > r.Wave && w.Steps["pending"] != w.Size {
				bad = true
			}
			if bad {
				vmu.Lock()
				violations = append(violations, fmt.Sprintf("revision %d: wave %d (current %d) steps %v size %d", r.Revision, w.Index, r.Wave, w.Steps, w.Size))
				vmu.Unlock()
			}
		}
	})
	r = f.waitPhase("r1", rollout.PhaseSucceeded)
	if n := stop(); n < 3 {
		t.Errorf("only %d events streamed", n)
	}
	if len(violations) > 0 {
		t.Fatalf("the stream showed waves out of order:\n%s", strings.Join(violations, "\n"))
	}
	if r.Steps["healthy"] != 20 || r.Failures != 0 || r.Wave != 4 || r.FinishedAt == nil {
		t.Fatalf("finished rollout = %+v", r)
	}
	for _, w := range r.Waves {
		if w.State != "passed" || w.Steps["healthy"] != w.Size || w.StartedAt == nil || w.FinishedAt == nil {
			t.Fatalf("wave %+v", w)
		}
		if w.Index > 0 && *w.StartedAt < *r.Waves[w.Index-1].FinishedAt {
			t.Fatalf("wave %d started at %s, before wave %d finished at %s", w.Index, *w.StartedAt, w.Index-1, *r.Waves[w.Index-1].FinishedAt)
		}
	}
	for id, a := range f.agents {
		if a.Active() != "2.0.0" || !reflect.DeepEqual(a.History(), []string{"2.0.0"}) {
			t.Fatalf("agent %s: %v", id, a)
		}
	}
	// The plan that ran is the one planned before.
	if got := membership(f.rolloutDevices("r1", "")); !reflect.DeepEqual(got, planMembership(p1)) {
		t.Fatalf("waves run = %v\nwaves planned = %v", got, planMembership(p1))
	}
	// The desired state names the rollout and carries the health policy.
	first := p1.Waves[0].Devices[0]
	d := f.device(first)
	if d.Desired == nil || d.Desired.Slots[0].RolloutID != "r1" || d.Desired.Slots[0].Version != "2.0.0" || d.Desired.Slots[0].Rollback {
		t.Fatalf("desired state of %s = %+v", first, d.Desired)
	}
	obs := testdevice.Connect(t, f.mqtt, first)
	ds := desiredOf(t, obs.Next(obs.Subscribe(wire.KindDesired)))
	want := &pb.HealthPolicy{WatchMs: 150, MaxErrorRate: 0.1, MaxLatencyP99Ms: 250, MinInferences: 5}
	if s := ds.GetSlots()[0]; s.GetRolloutId() != "r1" || !proto.Equal(s.GetHealth(), want) {
		t.Fatalf("published slot = %v, want health %v", s, want)
	}
	var hist []string
	for _, h := range r.History {
		hist = append(hist, h.Message)
	}
	if !slices.ContainsFunc(hist, func(s string) bool { return strings.Contains(s, "wave 4 of 4 passed") }) {
		t.Fatalf("history = %q", hist)
	}
	var l api.RolloutList
	f.call("GET", "/v1/rollouts", nil, http.StatusOK, &l)
	if len(l.Rollouts) != 1 || l.Rollouts[0].Phase != "succeeded" {
		t.Fatalf("list = %+v", l)
	}
}

func planMembership(p api.RolloutPlan) [][]string {
	var out [][]string
	for _, w := range p.Waves {
		out = append(out, w.Devices)
	}
	return out
}

// TestRolloutStratified checks that every wave takes devices from every
// site in proportion.
func TestRolloutStratified(t *testing.T) {
	f := startRolloutFleet(t)
	sites := []string{"north", "south", "west"}
	f.addAgents(24, "grid", func(i int) map[string]string {
		// 12 north, 8 south, 4 west.
		site := sites[0]
		if i >= 12 {
			site = sites[1]
		}
		if i >= 20 {
			site = sites[2]
		}
		return map[string]string{"fleet": "a", "site": site}
	}, nil)
	var p api.RolloutPlan
	f.call("POST", "/v1/rollouts?dryRun=true", []byte(`{"name":"strat","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["25%","50%","100%"],"stratifyBy":"site"}}`), http.StatusOK, &p)
	want := []map[string]int{
		{"north": 3, "south": 2, "west": 1},
		{"north": 3, "south": 2, "west": 1},
		{"north": 6, "south": 4, "west": 2},
	}
	for i, w := range p.Waves {
		if !reflect.DeepEqual(w.Strata, want[i]) {
			t.Fatalf("wave %d strata = %v, want %v", i, w.Strata, want[i])
		}
	}
}

// TestRolloutFailureBudgetRollsBack fails downloads of the new version:
// the first wave's failures exceed the budget, the rollout rolls the
// touched devices back, and no device outside that wave was touched.
func TestRolloutFailureBudgetRollsBack(t *testing.T) {
	f := startRolloutFleet(t)
	bad := map[string]testdevice.Behavior{"2.0.0": {FailDownload: "bundle digest mismatch"}}
	f.addAgents(20, "van", all, bad)
	f.createRollout(`{"name":"bad","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["10%","50%","100%"],"soak":"100ms","failureBudget":1}}`)
	r := f.waitPhase("bad", rollout.PhaseRolledBack)
	if r.Failures != 2 || r.Waves[0].State != "failed" || r.Waves[1].State != "stopped" || !strings.Contains(r.Reason, "over the failure budget of 1") ||
		!strings.Contains(r.Reason, "bundle digest mismatch") {
		t.Fatalf("rolled back rollout = %+v", r)
	}
	touched := 0
	for _, d := range f.rolloutDevices("bad", "") {
		dev := f.device(d.Device)
		switch d.Wave {
		case 0:
			touched++
			if d.Step != "rolled-back" || d.Previous != "m@1.0.0" || d.Failure == "" {
				t.Fatalf("wave 0 device = %+v", d)
			}
			// The desired state restores 1.0.0, deliberately.
			if s := dev.Desired.Slots[0]; s.Version != "1.0.0" || !s.Rollback || s.RolloutID != "bad" {
				t.Fatalf("desired slot of %s after rollback = %+v", d.Device, s)
			}
		default:
			if d.Step != "pending" || dev.Desired != nil {
				t.Fatalf("device %s outside the first wave was touched: %+v, desired %+v", d.Device, d, dev.Desired)
			}
		}
	}
	if touched != 2 {
		t.Fatalf("%d devices in the first wave, want 2", touched)
	}
	for id, a := range f.agents {
		if a.Active() != "1.0.0" || len(a.History()) > 1 {
			t.Fatalf("agent %s: %v", id, a)
		}
	}
}

// TestRolloutLocalRollbackCountsAsFailure: agents that switch back by
// themselves during the soak make the rollout roll back everything it
// touched, including the devices that were healthy.
func TestRolloutLocalRollbackCountsAsFailure(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(4, "ok", all, nil)
	f.addAgents(4, "flaky", all, map[string]testdevice.Behavior{"2.0.0": {RollBack: "error rate 0.31 above 0.05"}})
	f.createRollout(`{"name":"flaky","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["100%"],"soak":"100ms","failureBudget":"10%"}}`)
	r := f.waitPhase("flaky", rollout.PhaseRolledBack)
	// The first failure exceeds the budget of 0; the other flaky devices
	// may switch back before or after the rollback began.
	if r.Failures < 1 || r.Failures > 4 || !strings.Contains(r.Reason, "over the failure budget of 0") || !strings.Contains(r.Reason, "error rate 0.31") {
		t.Fatalf("rollout = %+v", r)
	}
	for _, d := range f.rolloutDevices("flaky", "") {
		if d.Step != "rolled-back" {
			t.Fatalf("device %+v", d)
		}
		if d.Failure != "" && (!strings.HasPrefix(d.Device, "flaky") || !strings.Contains(d.Failure, "error rate 0.31")) {
			t.Fatalf("device %s failure %q", d.Device, d.Failure)
		}
	}
	for id, a := range f.agents {
		if a.Active() != "1.0.0" {
			t.Fatalf("agent %s: %v", id, a)
		}
	}
}

// TestRolloutGates stops a model that errs too often and one that is too
// slow, with the figures in the verdicts.
func TestRolloutGates(t *testing.T) {
	cases := []struct {
		name     string
		behavior testdevice.Behavior
		gate     string
		want     []string
	}{
		{"errors", testdevice.Behavior{Inferences: 100, Latency: 10 * time.Millisecond, ErrorRate: 0.3},
			`{"type":"errorRate","max":0.05}`, []string{"error rate 30.00%", "ceiling 5.00%"}},
		{"latency", testdevice.Behavior{Inferences: 20, Every: 250 * time.Millisecond, Latency: 30 * time.Millisecond},
			`{"type":"latency","maxP99Ratio":1.5,"maxP95Ratio":1.5}`, []string{"p99 3", "on 2.0.0 vs 1", "on 1.0.0", "ABOVE LIMIT", "limit x1.50"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := startRolloutFleet(t)
			beh := map[string]testdevice.Behavior{
				"1.0.0": {Inferences: 100, Latency: 10 * time.Millisecond, Every: c.behavior.Every},
				"2.0.0": c.behavior,
			}
			f.addAgents(20, "cam", all, beh)
			f.createRollout(`{"name":"g","selector":"fleet=a","model":"m@2.0.0",
				"strategy":{"waves":["10%","100%"],"soak":"300ms","failureBudget":"50%","gates":[` + c.gate + `]}}`)
			r := f.waitPhase("g", rollout.PhaseRolledBack)
			w := r.Waves[0]
			if w.State != "failed" || len(w.Gates) != 1 || w.Gates[0].Result != rollout.Fail || r.Waves[1].Steps["pending"] != 18 {
				t.Fatalf("rollout = %+v", r)
			}
			for _, s := range c.want {
				if !strings.Contains(w.Gates[0].Detail, s) || !strings.Contains(r.Reason, s) {
					t.Fatalf("verdict %q / reason %q lacks %q", w.Gates[0].Detail, r.Reason, s)
				}
			}
			if len(w.Gates[0].Figures) < 3 {
				t.Fatalf("figures = %+v", w.Gates[0].Figures)
			}
			for _, d := range f.rolloutDevices("g", "?wave=0") {
				if d.Step != "rolled-back" || f.agents[d.Device].Active() != "1.0.0" {
					t.Fatalf("wave 0 device %+v, agent %v", d, f.agents[d.Device])
				}
			}
		})
	}
}

// TestRolloutInconclusiveGatePauses: without telemetry a gate cannot
// decide; the rollout pauses at the end of the wave, and resume goes on.
func TestRolloutInconclusiveGatePauses(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(4, "quiet", all, nil)
	f.createRollout(`{"name":"q","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["50%","100%"],"soak":"50ms","gates":[{"type":"errorRate","max":0.1},{"type":"drift","max":0.2}]}}`)
	r := f.waitPhase("q", rollout.PhasePaused)
	if r.Waves[0].State != "held" || !strings.Contains(r.Reason, "0 inferences") || !strings.Contains(r.Reason, "drift") ||
		r.Waves[1].Steps["pending"] != 2 || r.Waves[0].Gates[0].Result != rollout.Inconclusive {
		t.Fatalf("paused rollout = %+v", r)
	}
	f.act("q", "resume")
	r = f.waitPhase("q", rollout.PhasePaused) // the second wave is as quiet
	if r.Waves[0].State != "passed" || !r.Waves[0].Override || r.Waves[1].State != "held" {
		t.Fatalf("after resume = %+v", r)
	}
	f.act("q", "resume")
	f.waitPhase("q", rollout.PhaseSucceeded)
}

// TestRolloutApprovalPauseResume holds the rollout before an approval
// wave, and pause stops notifications until resume.
func TestRolloutApprovalPauseResume(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(10, "kiosk", all, map[string]testdevice.Behavior{"2.0.0": {Download: 100 * time.Millisecond}})
	f.createRollout(`{"name":"appr","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["20%",{"size":"60%","approval":true},"100%"],"soak":"50ms","maxConcurrentDownloads":1}}`)
	r := f.waitPhase("appr", rollout.PhaseWaitingApproval)
	if r.Waves[0].State != "passed" || r.Waves[1].State != "waiting-approval" || r.Waves[1].Steps["pending"] != 4 || !r.Waves[1].Approval {
		t.Fatalf("waiting rollout = %+v", r)
	}
	// Nothing moves while it waits.
	time.Sleep(300 * time.Millisecond)
	if r2 := f.rollout("appr"); r2.Revision != r.Revision {
		t.Fatalf("rollout changed while waiting for approval: %+v", r2)
	}
	f.apiError("POST", "/v1/rollouts/appr/resume", nil, http.StatusConflict, "waits for approval")
	f.apiError("POST", "/v1/rollouts/appr/nonsense", nil, http.StatusNotFound, "no action")
	f.apiError("POST", "/v1/rollouts/nobody/approve", nil, http.StatusNotFound, `rollout "nobody"`)

	r = f.act("appr", "approve")
	if r.Phase != "running" || !r.Waves[1].Approved {
		t.Fatalf("approved = %+v", r)
	}
	// Pause as soon as the approved wave is under way.
	r = f.act("appr", "pause")
	if r.Phase != "paused" {
		t.Fatalf("paused = %+v", r)
	}
	f.apiError("POST", "/v1/rollouts/appr/approve", nil, http.StatusConflict, "no wave waits for approval")
	// With one download at a time, at most one device was notified by now,
	// and nothing new is notified while paused.
	before := f.rollout("appr").Waves[1].Steps["pending"]
	time.Sleep(400 * time.Millisecond)
	after := f.rollout("appr")
	if after.Waves[1].Steps["pending"] != before || before < 2 {
		t.Fatalf("devices notified while paused: pending %d -> %d (%+v)", before, after.Waves[1].Steps["pending"], after)
	}
	f.act("appr", "resume")
	r = f.waitPhase("appr", rollout.PhaseSucceeded)
	if r.Steps["healthy"] != 10 {
		t.Fatalf("succeeded = %+v", r)
	}
	f.apiError("POST", "/v1/rollouts/appr/pause", nil, http.StatusConflict, "it is finished")
}

// TestRolloutDeadlinePolicies puts 20% of the targets offline; each
// unreachable policy is applied as configured and the rollout finishes.
func TestRolloutDeadlinePolicies(t *testing.T) {
	for _, policy := range []string{"fail", "skip", "wait"} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			f := startRolloutFleet(t)
			f.addAgents(8, "on", all, nil)
			off := f.addAgents(2, "off", all, nil)
			for _, a := range off {
				a.Stop()
			}
			testdevice.Eventually(t, func() (bool, string) {
				return !f.device("off-000").Online && !f.device("off-001").Online, "still online"
			})
			f.createRollout(fmt.Sprintf(`{"name":"p","selector":"fleet=a","model":"m@2.0.0",
				"strategy":{"waves":["100%%"],"soak":"50ms","deadline":"5s","unreachable":%q,"failureBudget":2}}`, policy))
			switch policy {
			case "fail":
				r := f.waitPhase("p", rollout.PhaseSucceeded)
				if r.Steps["timed-out"] != 2 || r.Failures != 2 || r.Steps["healthy"] != 8 {
					t.Fatalf("rollout = %+v", r)
				}
				for _, d := range f.rolloutDevices("p", "?step=timed-out") {
					if !strings.HasPrefix(d.Device, "off") || !strings.Contains(d.Failure, "unreachable") {
						t.Fatalf("timed out device %+v", d)
					}
				}
			case "skip":
				r := f.waitPhase("p", rollout.PhaseSucceeded)
				if r.Steps["skipped"] != 2 || r.Failures != 0 || r.Steps["healthy"] != 8 {
					t.Fatalf("rollout = %+v", r)
				}
			case "wait":
				r := f.waitRollout("p", "healthy on the online devices", func(r api.Rollout) bool { return r.Steps["healthy"] == 8 })
				time.Sleep(5100 * time.Millisecond) // past the deadline
				r = f.rollout("p")
				if r.Phase != "running" || r.Steps["notified"] != 2 {
					t.Fatalf("rollout = %+v", r)
				}
				// They come back and finish the wave.
				for _, a := range off {
					f.agents[a.ID] = testdevice.StartAgent(t, f.mqtt, a.ID, all(0), f.ref("1.0.0"), nil)
				}
				r = f.waitPhase("p", rollout.PhaseSucceeded)
				if r.Steps["healthy"] != 10 || r.Failures != 0 {
					t.Fatalf("rollout = %+v", r)
				}
			}
		})
	}
}

// TestRolloutConflictAndLateJoiner refuses a second rollout into the same
// slot of the same devices, and gives a device that starts to match the
// selector during a rollout the new version once it succeeds.
func TestRolloutConflictAndLateJoiner(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(6, "eu", func(int) map[string]string { return map[string]string{"region": "eu"} }, nil)
	f.addAgents(2, "us", func(int) map[string]string { return map[string]string{"region": "us"} }, nil)
	f.createRollout(`{"name":"eu-2","selector":"region=eu","model":"m@2.0.0",
		"strategy":{"waves":["50%",{"size":"100%","approval":true}],"soak":"50ms"}}`)
	f.waitPhase("eu-2", rollout.PhaseWaitingApproval)

	f.apiError("POST", "/v1/rollouts", []byte(`{"name":"all-1","selector":"","model":"m@1.0.0"}`), http.StatusConflict,
		"rollout eu-2 (m@2.0.0 into slot default, waiting-approval) already manages slot default on 6 of the 8 target devices (eu-000, eu-001, eu-002)")
	f.apiError("POST", "/v1/rollouts", []byte(`{"name":"eu-2","selector":"region=us","model":"m@1.0.0"}`), http.StatusConflict, `a rollout named "eu-2" exists`)
	// A plain assignment underneath it is refused too.
	f.apiError("POST", "/v1/assignments", []byte(`{"model":"m","version":"1.0.0","selector":"region"}`), http.StatusConflict,
		"rollout eu-2 (m@2.0.0 into slot default, waiting-approval) already manages slot default on 6 of the 8 target devices")
	// Another slot, or other devices, are fine.
	f.createRollout(`{"name":"us-2","selector":"region=us","model":"m@2.0.0","strategy":{"soak":"50ms"}}`)
	f.createRollout(`{"name":"us-shadow","selector":"region=us","model":"m@1.0.0","slot":"shadow","strategy":{"soak":"50ms"}}`)

	// A device joins region=eu while eu-2 waits.
	late := f.addAgents(1, "eu-late", func(int) map[string]string { return map[string]string{"region": "eu"} }, nil)[0]
	time.Sleep(200 * time.Millisecond)
	if late.Active() != "1.0.0" {
		t.Fatalf("late joiner updated before the rollout succeeded: %v", late)
	}
	f.act("eu-2", "approve")
	r := f.waitRollout("eu-2", "succeeded with the late joiner healthy", func(r api.Rollout) bool {
		return r.Phase == "succeeded" && r.Late["healthy"] == 1
	})
	if r.Targets != 6 || r.Steps["healthy"] != 6 {
		t.Fatalf("rollout = %+v", r)
	}
	if late.Active() != "2.0.0" {
		t.Fatalf("late joiner: %v", late)
	}
	devs := f.rolloutDevices("eu-2", "?wave=2")
	if len(devs) != 1 || devs[0].Device != late.ID {
		t.Fatalf("late joiners = %+v", devs)
	}
	f.waitPhase("us-2", rollout.PhaseSucceeded)

	// Now a new rollout of eu is no conflict; roll the finished one back.
	r = f.act("eu-2", "rollback")
	if r.Phase != "rolling-back" {
		t.Fatalf("rollback = %+v", r)
	}
	f.waitPhase("eu-2", rollout.PhaseRolledBack)
	for id, a := range f.agents {
		if strings.HasPrefix(id, "eu") && a.Active() != "1.0.0" {
			t.Fatalf("agent %v after rollback", a)
		}
	}
}

// TestRolloutBadSpecs checks the answers to specifications that cannot be
// run.
func TestRolloutBadSpecs(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(2, "d", all, nil)
	for _, c := range []struct {
		spec   string
		status int
		want   string
	}{
		{`{"selector":"fleet=a","model":"m@9.9.9"}`, http.StatusNotFound, "m@9.9.9 is not stored"},
		{`{"selector":"fleet=b","model":"m@2.0.0"}`, http.StatusBadRequest, `no device matches selector "fleet=b"`},
		{`{"selector":"fleet in (a","model":"m@2.0.0"}`, http.StatusBadRequest, "selector"},
		{`{"selector":"fleet=a","model":"m"}`, http.StatusBadRequest, "NAME@VERSION"},
		{`{"selector":"fleet=a","model":"m@2.0.0","strategy":{"waves":["150%"]}}`, http.StatusBadRequest, "percentage from 0% to 100%"},
		{`{"selector":"fleet=a","model":"m@2.0.0","strategy":{"waves":["50%","10%"]}}`, http.StatusBadRequest, "below the wave before"},
		{`{"selector":"fleet=a","model":"m@2.0.0","strategy":{"unreachable":"ignore"}}`, http.StatusBadRequest, "choose fail, skip or wait"},
		{`{"selector":"fleet=a","model":"m@2.0.0","strategy":{"gates":[{"type":"vibes"}]}}`, http.StatusBadRequest, `unknown gate type "vibes"`},
		{`{"selector":"fleet=a","model":"m@2.0.0","strategy":{"soak":"soon"}}`, http.StatusBadRequest, "want a duration"},
		{`{"selector":"fleet=a","model":"m@2.0.0","stratgey":{}}`, http.StatusBadRequest, `unknown field "stratgey"`},
		{`{"name":"Bad Name","selector":"fleet=a","model":"m@2.0.0"}`, http.StatusBadRequest, `name "Bad Name"`},
	} {
		f.apiError("POST", "/v1/rollouts", []byte(c.spec), c.status, c.want)
	}
	f.apiError("GET", "/v1/rollouts/nobody", nil, http.StatusNotFound, `rollout "nobody"`)
	f.apiError("GET", "/v1/rollouts/Bad%20Id", nil, http.StatusBadRequest, "malformed")
	// A generated name, when none is given.
	r := f.createRollout(`{"selector":"fleet=a","model":"m@2.0.0","strategy":{"soak":"10ms"}}`)
	if !strings.HasPrefix(r.ID, "m-2.0.0-") || r.Spec.Slot != "default" || r.Spec.Strategy.Unreachable != "fail" || r.Spec.Strategy.OnFailure != "rollback" {
		t.Fatalf("rollout = %+v", r)
	}
	f.apiError("GET", "/v1/rollouts/"+r.ID+"/devices?step=nope", nil, http.StatusBadRequest, "step")
	f.waitPhase(r.ID, rollout.PhaseSucceeded)
}

// TestRolloutResumesAfterRestart stops the controller in the middle of a
// rollout and starts another on the same data: it carries on where it
// stood, without a second notification of the devices already done.
func TestRolloutResumesAfterRestart(t *testing.T) {
	dir := t.TempDir()
	h := start(t, dir, func(c *Config) { c.rolloutTuning = fastRollouts })
	f := &rolloutFleet{harness: h, digests: map[string]string{}, agents: map[string]*testdevice.Agent{}}
	for _, v := range []string{"1.0.0", "2.0.0"} {
		b := makeBundle(t, "m", v, []byte("module "+v))
		h.call("POST", "/v1/models", encode(t, b), http.StatusCreated, nil)
		f.digests[v] = b.Digest
	}
	f.addAgents(10, "st", all, nil)
	f.createRollout(`{"name":"rs","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["30%",{"size":"100%","approval":true}],"soak":"50ms"}}`)
	before := f.waitPhase("rs", rollout.PhaseWaitingApproval)
	gens := map[string]uint64{}
	for _, d := range f.rolloutDevices("rs", "?wave=0") {
		gens[d.Device] = d.Generation
	}
	h.stop()

	h2 := start(t, dir, func(c *Config) {
		c.rolloutTuning = fastRollouts
		c.MQTTListen = strings.TrimPrefix(f.mqtt, "tcp://")
	})
	f.harness = h2
	f.waitKnown(slices.Collect(func(yield func(*testdevice.Agent) bool) {
		for _, a := range f.agents {
			if !yield(a) {
				return
			}
		}
	}))
	after := f.rollout("rs")
	if after.Phase != "waiting-approval" || after.Waves[0].Steps["healthy"] != 3 || after.Revision != before.Revision {
		t.Fatalf("after restart = %+v", after)
	}
	f.act("rs", "approve")
	f.waitPhase("rs", rollout.PhaseSucceeded)
	for _, d := range f.rolloutDevices("rs", "?wave=0") {
		if d.Generation != gens[d.Device] {
			t.Fatalf("device %s of the first wave was issued generation %d after the restart, before %d", d.Device, d.Generation, gens[d.Device])
		}
	}
	for id, a := range f.agents {
		if !reflect.DeepEqual(a.History(), []string{"2.0.0"}) {
			t.Fatalf("agent %s: %v", id, a)
		}
	}
}
