package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/fleet/sim"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// compiledModel builds the example fraud-score model (XGBoost, compiled to
// a 10 KB module) at version and returns the bundle file's bytes.
func compiledModel(t *testing.T, version string) []byte {
	t.Helper()
	spec, err := compiler.ReadSpec(filepath.Join("..", "..", "models", "examples", "fraud-score"))
	if err != nil {
		t.Fatal(err)
	}
	spec.Version = version
	r, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	data, err := r.Bundle.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// restartController kills the controller (no clean shutdown: a crash) and
// starts it again on the same ports and data directory (and broker).
func (f *fleet) restartController() {
	f.t.Helper()
	f.ctrl.Kill()
	httpAddr := strings.TrimPrefix(f.api, "http://")
	mqttAddr := strings.TrimPrefix(f.broker, "tcp://")
	args := []string{"--data", filepath.Join(f.dir, "controller"), "--http-listen", httpAddr, "--mqtt-listen", mqttAddr}
	if f.external {
		args = append(args[:4], "--broker", f.broker)
	}
	var err error
	for i := 0; ; i++ { // the killed process's ports can take a moment to free
		if err = proc.CheckFree(httpAddr); err == nil && !f.external {
			err = proc.CheckFree(mqttAddr)
		}
		if err == nil || i == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		f.t.Fatal(err)
	}
	p, err := proc.Start("fleet-controller", filepath.Join(f.dir, "controller.log"), filepath.Join(binDir, "fleet-controller"), args...)
	if err != nil {
		f.t.Fatal(err)
	}
	f.ctrl = p
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.WaitHTTP(ctx, f.api+"/healthz"); err != nil {
		f.t.Fatal(err, "\n", f.logTail("controller.log"))
	}
}

// byID indexes the controller's device list.
func (f *fleet) byID(sel string) map[string]client.Device {
	out := map[string]client.Device{}
	for _, d := range f.devices(sel) {
		out[d.ID] = d
	}
	return out
}

// TestSimulatedFleet runs 50 simulated devices (real agent code in this
// process) against the real fleet-controller binary and its embedded
// broker: labels as distributed, offline devices known but offline, a
// model assigned by selector, inference telemetry counted, a controller
// crash and restart in the middle, a version that fails on the failing
// devices, and the offline devices catching up when they come back.
func TestSimulatedFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startController(t, "")
	labels, err := sim.ParseLabels("region=eu:60,us:40;hw=jetson,rpi5;site=s1..s5")
	if err != nil {
		t.Fatal(err)
	}
	// The devices' logs go to one file, shown when the test fails.
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
	s, err := sim.New(sim.Options{
		AgentLogger: slog.New(slog.NewTextHandler(simLog, nil)),
		Agents:      50, Broker: f.broker, Controller: f.api, Labels: labels, Seed: 7,
		Rate: 2, Offline: 0.2, Failing: 0.3, FailModel: "fraud-score@1.1.0",
		DataDir: filepath.Join(f.dir, "sim"), MaxBackoff: 2 * time.Second, RetryMin: 200 * time.Millisecond,
		// Every desired state is checked against the controller's key;
		// the bundles of this test are unsigned.
		DirectorKeys:  []string{filepath.Join(f.dir, "controller", "keys", "director.pub")},
		AllowUnsigned: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sim: %v", err)
		}
	})
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	if err := s.WaitJoined(wctx); err != nil {
		t.Fatal(err)
	}

	agents := s.Agents()
	var online, offline, eu []string
	for _, a := range agents {
		if a.Online() {
			online = append(online, a.ID)
		} else {
			offline = append(offline, a.ID)
		}
		if a.Labels["region"] == "eu" {
			eu = append(eu, a.ID)
		}
	}
	if len(offline) != 10 || len(eu) != 30 {
		t.Fatalf("%d offline and %d in eu; want 10 and 30 of 50", len(offline), len(eu))
	}
	f.eventually("the controller knows every device, with its labels and presence", 30*time.Second, func() (bool, string) {
		devs := f.byID("")
		for _, a := range agents {
			d, ok := devs[a.ID]
			if !ok {
				return false, a.ID + " unknown"
			}
			if formatLabels(d.Labels) != formatLabels(a.Labels) {
				return false, fmt.Sprintf("%s labels %v, simulated %v", a.ID, d.Labels, a.Labels)
			}
			if d.Online != a.Online() {
				return false, fmt.Sprintf("%s online=%v at the controller, %v in the simulator", a.ID, d.Online, a.Online())
			}
		}
		return len(devs) == 50, fmt.Sprintf("%d devices", len(devs))
	})
	if n := len(f.devices("region=eu")); n != 30 {
		t.Fatalf("selector region=eu matched %d devices, want 30", n)
	}

	for _, v := range []string{"1.0.0", "1.1.0"} {
		if _, err := f.client.PushModel(ctx, compiledModel(t, v)); err != nil {
			t.Fatalf("push fraud-score %s: %v", v, err)
		}
	}
	if _, err := f.client.Assign(ctx, client.Assignment{Model: "fraud-score", Version: "1.0.0", Selector: "region in (eu,us)"}); err != nil {
		t.Fatal(err)
	}
	f.waitRunning("fraud-score@1.0.0", online...)
	for _, id := range offline {
		if got := s.Agent(id).Active("default"); got != "" {
			t.Fatalf("offline device %s runs %s", id, got)
		}
	}
	f.eventually("inferences counted at the controller, none failed", 60*time.Second, func() (bool, string) {
		devs := f.byID("")
		for _, id := range online {
			if d := devs[id]; d.Inferences == 0 || d.InferenceErrors != 0 {
				return false, fmt.Sprintf("%s: %d inferences, %d errors", id, d.Inferences, d.InferenceErrors)
			}
		}
		return true, ""
	})

	// A crash of the controller takes its embedded broker down: every
	// device loses its session and must come back by itself.
	f.restartController()
	f.eventually("devices back after the controller restart", 60*time.Second, func() (bool, string) {
		st := s.Stats()
		return st.Connected == len(online), fmt.Sprintf("%d of %d connected", st.Connected, len(online))
	})

	if _, err := f.client.Assign(ctx, client.Assignment{Model: "fraud-score", Version: "1.1.0", Selector: "region=eu"}); err != nil {
		t.Fatal(err)
	}
	var euHealthy, euFailing []string
	for _, id := range eu {
		if a := s.Agent(id); a.Online() && a.Failing() {
			euFailing = append(euFailing, id)
		} else if a.Online() {
			euHealthy = append(euHealthy, id)
		}
	}
	if len(euFailing) == 0 || len(euHealthy) == 0 {
		t.Fatalf("seed 7 gives %d failing and %d healthy online eu devices; the test needs some of each", len(euFailing), len(euHealthy))
	}
	f.waitRunning("fraud-score@1.1.0", euHealthy...)
	// The failing devices fail 1.1.0: the controller counts their errors,
	// and their agents' health watch rolls them back to 1.0.0.
	f.eventually("1.1.0 failing on the failing devices, and rolled back there", 60*time.Second, func() (bool, string) {
		devs := f.byID("region=eu")
		for _, id := range euFailing {
			d := devs[id]
			if got := d.Active("default").String(); d.InferenceErrors == 0 || got != "fraud-score@1.0.0" {
				return false, fmt.Sprintf("failing %s runs %s with %d errors counted", id, got, d.InferenceErrors)
			}
		}
		for _, id := range euHealthy {
			if d := devs[id]; d.InferenceErrors != 0 {
				return false, fmt.Sprintf("healthy %s has %d errors counted", id, d.InferenceErrors)
			}
		}
		return true, ""
	})

	// The offline devices come back and converge to what is desired for
	// them now. Those in eu never ran 1.0.0: a failing one has nothing to
	// roll back to and keeps serving 1.1.0, unhealthy.
	for _, id := range offline {
		s.Agent(id).SetOnline(true)
	}
	want := map[string]string{}
	for _, id := range offline {
		want[id] = "fraud-score@1.0.0"
		if s.Agent(id).Labels["region"] == "eu" {
			want[id] = "fraud-score@1.1.0"
		}
	}
	f.eventually("the offline devices catching up", 60*time.Second, func() (bool, string) {
		devs := f.byID("")
		var behind []string
		for id, v := range want {
			d := devs[id]
			if got := d.Active("default").String(); got != v || !d.Online || d.Desired == nil || d.ReportedGeneration != d.Desired.Generation {
				behind = append(behind, fmt.Sprintf("%s runs %s (online %v)", id, got, d.Online))
			}
		}
		sort.Strings(behind)
		return len(behind) == 0, strings.Join(behind, ", ")
	})
	st := s.Stats()
	if st.ModelLoads > 4 {
		t.Errorf("%d model loads for 2 bundles; the simulator shares loaded models", st.ModelLoads)
	}
	if _, err := os.Stat(filepath.Join(f.dir, "sim", agents[0].ID, "state.json")); err != nil {
		t.Errorf("the devices' data directories are not under DataDir: %v", err)
	}
}

// waitRunning waits until the controller reports model@version active on
// every device in ids.
func (f *fleet) waitRunning(model string, ids ...string) {
	f.t.Helper()
	f.eventually(model+" active on "+fmt.Sprint(len(ids))+" devices", 90*time.Second, func() (bool, string) {
		devs := f.byID("")
		for _, id := range ids {
			d := devs[id]
			if got := d.Active("default").String(); got != model {
				return false, id + " runs " + got
			}
		}
		return true, ""
	})
}

func formatLabels(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s,", k, l[k])
	}
	return b.String()
}
