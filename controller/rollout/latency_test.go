package rollout_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// The latency gate end to end through the engine, on a real store: the
// devices' installs, states, events and per-minute telemetry are played
// by the test on a fake clock (the engine's and the devices'), so the
// minutes the gate reads are exactly the ones a test lays out.

// clock is the fake clock of the engine and the simulated devices.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// t0 is a minute boundary: the install of 1.0.0 starts here.
var lt0 = time.Date(2026, 1, 5, 10, 0, 0, 0, time.UTC)

func at(min, sec int) time.Time {
	return lt0.Add(time.Duration(min)*time.Minute + time.Duration(sec)*time.Second)
}

// latencyFleet is a fleet on the fake clock, with the telemetry its
// devices send.
type latencyFleet struct {
	*fleet
	clk *clock
	seq map[string]uint64
	rng *rand.Rand
}

// startLatencyFleet registers n devices that installed 1.0.0 together at
// lt0 (downloading at 0:05, activated around 1:10, as a fleet does when
// one assignment reaches everyone), with latencies inflated while the
// fleet compiled (minute 1, 4 ms) and 1 ms after (minutes 2 and 3). The
// engine starts at 3:50.
func startLatencyFleet(t *testing.T, n int) *latencyFleet {
	t.Helper()
	clk := &clock{t: lt0}
	f := &latencyFleet{fleet: newFleet(t, n, clk.Now), clk: clk, seq: map[string]uint64{}, rng: rand.New(rand.NewPCG(7, uint64(n)))}
	for i, id := range f.ids {
		act := at(1, 10+i)
		f.event(id, pb.EventKind_EVENT_KIND_DOWNLOADING, f.v1, at(0, 5), 0, "")
		f.event(id, pb.EventKind_EVENT_KIND_VERIFIED, f.v1, at(0, 40), 0, "")
		f.event(id, pb.EventKind_EVENT_KIND_ACTIVATED, f.v1, act, 0, "")
		f.report(id, 0, f.v1, act)
		f.minute(id, f.v1, 1, 100, 4*time.Millisecond, 0)
		f.minute(id, f.v1, 2, 100, time.Millisecond, 0.2)
		f.minute(id, f.v1, 3, 100, time.Millisecond, 0.2)
	}
	f.clk.set(at(3, 50))
	f.start(rollout.Options{Now: f.clk.Now, GateInterval: time.Second, MaxSleep: 20 * time.Millisecond})
	return f
}

func (f *latencyFleet) event(id string, kind pb.EventKind, m store.Model, when time.Time, gen uint64, rolloutID string) {
	f.t.Helper()
	if err := f.inv.Event(f.t.Context(), id, when, &pb.Event{Kind: kind, Slot: "default", Model: ref(m), Generation: gen,
		RolloutId: rolloutID, AtUnixMs: when.UnixMilli()}); err != nil {
		f.t.Fatal(err)
	}
	f.changed(id)
}

func (f *latencyFleet) report(id string, gen uint64, active store.Model, since time.Time) {
	f.t.Helper()
	s := &pb.SlotState{Slot: "default", Active: ref(active), Healthy: true, ActiveSinceUnixMs: since.UnixMilli()}
	if err := f.inv.State(f.t.Context(), id, f.clk.Now(), &pb.ReportedState{Slots: []*pb.SlotState{s}, DesiredGeneration: gen, Health: pb.Health_HEALTH_OK}); err != nil {
		f.t.Fatal(err)
	}
	f.changed(id)
}

// minute stores device id's aggregate of m for minute min after lt0: n
// inferences of about typical latency, each up to jitter of it slower
// (uniform), as the agent sends it at the minute's end.
func (f *latencyFleet) minute(id string, m store.Model, min, n int, typical time.Duration, jitter float64) {
	f.t.Helper()
	h := summary.NewLatency()
	for range n {
		us := float64(typical.Microseconds()) * (1 + jitter*f.rng.Float64())
		summary.Observe(h, us, 1)
	}
	f.seq[id]++
	start := at(min, 0)
	rec := store.TelemetryRecord{Seq: f.seq[id], Kind: store.RecordAggregate, At: start, Aggregate: &pb.InferenceAggregate{
		Slot: "default", Model: m.Name, Version: m.Version, StartUnixMs: start.UnixMilli(), IntervalMs: 60_000, Count: uint64(n), LatencyUs: h}}
	if _, err := f.st.StoreTelemetry(f.t.Context(), id, "e", start, []store.TelemetryRecord{rec}); err != nil {
		f.t.Fatal(err)
	}
}

// wave returns the devices sent 2.0.0 and their generations, once n are.
func (f *latencyFleet) wave(n int) map[string]uint64 {
	f.t.Helper()
	out := map[string]uint64{}
	f.wait(fmt.Sprintf("%d devices sent 2.0.0", n), func() (bool, string) {
		clear(out)
		for _, id := range f.ids {
			d, err := f.st.DesiredState(f.t.Context(), id)
			if err != nil {
				continue
			}
			for _, s := range d.Slots {
				if s.Version == "2.0.0" {
					out[id] = d.Generation
				}
			}
		}
		return len(out) == n, fmt.Sprint(len(out))
	})
	return out
}

func latencyVerdict(s rollout.Status, wave int) rollout.Verdict {
	if wave < len(s.Waves) {
		for _, v := range s.Waves[wave].Verdicts {
			if v.Gate == rollout.GateLatency {
				return v
			}
		}
	}
	return rollout.Verdict{}
}

// update plays the wave's devices installing 2.0.0: downloading at 4:00,
// activated at 4:20, on a loaded CPU (1.0.0 at 4 ms meanwhile), and then
// serving 2.0.0 at typical latency: cold and busy in minute 4 (three
// calls at 12 ms, the rest at typical), steady in minute 5. The rest of
// the fleet serves 1.0.0 at 1 ms throughout.
func (f *latencyFleet) update(wave map[string]uint64, id string, typical time.Duration) {
	f.t.Helper()
	f.clk.set(at(4, 25))
	for dev, gen := range wave {
		f.event(dev, pb.EventKind_EVENT_KIND_DOWNLOADING, f.v2, at(4, 0), gen, id)
		f.event(dev, pb.EventKind_EVENT_KIND_VERIFIED, f.v2, at(4, 10), gen, id)
		f.event(dev, pb.EventKind_EVENT_KIND_ACTIVATED, f.v2, at(4, 20), gen, id)
		f.report(dev, gen, f.v2, at(4, 20))
		f.minute(dev, f.v1, 4, 30, 4*time.Millisecond, 0)
		f.minute(dev, f.v2, 4, 3, 12*time.Millisecond, 0)
		f.minute(dev, f.v2, 4, 60, typical, 0.2)
		f.minute(dev, f.v2, 5, 100, typical, 0.2)
	}
	for _, dev := range f.ids {
		if _, ok := wave[dev]; !ok {
			f.minute(dev, f.v1, 4, 100, time.Millisecond, 0.2)
			f.minute(dev, f.v1, 5, 100, time.Millisecond, 0.2)
		}
	}
	// The soak (60 s from 4:20) is over at 5:30, with minute 5 stored.
	f.clk.set(at(5, 30))
	for dev, gen := range wave {
		f.report(dev, gen, f.v2, at(4, 20))
	}
}

const latencySpec = `{"selector":"fleet=t","model":"m@2.0.0","strategy":{"waves":%s,"soak":"60s","deadline":"10m",
	"gates":[{"type":"latency","maxP95Ratio":1.5,"minInferences":50}]}}`

// TestLatencyGateStopsSlowVersionAfterInstall is the defect the e2e test
// TestRolloutSlowVersionStoppedByLatencyGate found: a baseline reaching
// back over the minutes when the fleet installed 1.0.0 (latencies
// inflated by the compiling) let a version 3x slower pass (p95 3 ms
// against a baseline p95 of 4 ms). Compared over the same minutes, on the
// devices outside the wave, it is stopped.
func TestLatencyGateStopsSlowVersionAfterInstall(t *testing.T) {
	t.Parallel()
	f := startLatencyFleet(t, 16)
	id := f.create(fmt.Sprintf(latencySpec, `["25%","100%"]`))
	wave := f.wave(4)
	f.update(wave, id, 3*time.Millisecond)
	var s rollout.Status
	f.wait("the latency gate to stop the rollout", func() (bool, string) {
		s = f.status(id)
		return s.Phase == rollout.PhaseRollingBack || s.Wave > 0, fmt.Sprintf("%s wave %d %q %+v", s.Phase, s.Wave, s.Reason, latencyVerdict(s, 0))
	})
	v := latencyVerdict(s, 0)
	if s.Phase != rollout.PhaseRollingBack || v.Result != rollout.Fail || !strings.Contains(s.Reason, "gate failed in wave 1: latency") {
		t.Fatalf("rollout %s wave %d %q; verdict %+v", s.Phase, s.Wave+1, s.Reason, v)
	}
	// p95 of 2.0.0 in minute 5 (3 ms, jittered) against 1.0.0 on the
	// twelve devices outside the wave in the same minute (1 ms).
	for _, want := range []string{"on 2.0.0 vs", "on 1.0.0: x", "ABOVE LIMIT", "400 samples on 4 devices vs 1200 on 12 devices outside the wave, same 1 minutes"} {
		if !strings.Contains(v.Detail, want) {
			t.Errorf("verdict %q lacks %q", v.Detail, want)
		}
	}
	if r := figure(v, "p95Ratio"); r < 2.5 || r > 3.6 {
		t.Errorf("p95 ratio %.2f, want about 3", r)
	}
}

// TestLatencyGateSameSpeedPasses: a version as fast as the old one, with
// the same noise, passes; the cold calls of its activation minute do not
// count against it.
func TestLatencyGateSameSpeedPasses(t *testing.T) {
	t.Parallel()
	f := startLatencyFleet(t, 16)
	id := f.create(fmt.Sprintf(latencySpec, `["25%","100%"]`))
	wave := f.wave(4)
	f.update(wave, id, time.Millisecond)
	var s rollout.Status
	f.wait("wave 1 to pass", func() (bool, string) {
		s = f.status(id)
		return s.Wave > 0 || s.Phase != rollout.PhaseRunning, fmt.Sprintf("%s wave %d %q %+v", s.Phase, s.Wave, s.Reason, latencyVerdict(s, 0))
	})
	v := latencyVerdict(s, 0)
	if s.Phase != rollout.PhaseRunning || s.Waves[0].State != rollout.WavePassed || v.Result != rollout.Pass {
		t.Fatalf("rollout %s %q; verdict %+v", s.Phase, s.Reason, v)
	}
	if r := figure(v, "p95Ratio"); r < 0.85 || r > 1.2 {
		t.Errorf("p95 ratio %.2f, want about 1: %s", r, v.Detail)
	}
}

// TestLatencyGateWaitsForAMinuteAfterActivation: a wave whose soak ends
// in the minute its devices activated in has no minute of the new version
// that counts yet; the engine asks the gate again instead of pausing, and
// it decides once the next minute is in.
func TestLatencyGateWaitsForAMinuteAfterActivation(t *testing.T) {
	t.Parallel()
	f := startLatencyFleet(t, 16)
	id := f.create(strings.Replace(fmt.Sprintf(latencySpec, `["25%","100%"]`), `"soak":"60s"`, `"soak":"20s"`, 1))
	wave := f.wave(4)
	f.clk.set(at(4, 25))
	for dev, gen := range wave {
		f.event(dev, pb.EventKind_EVENT_KIND_ACTIVATED, f.v2, at(4, 20), gen, id)
		f.report(dev, gen, f.v2, at(4, 20))
		f.minute(dev, f.v2, 4, 200, 3*time.Millisecond, 0.2)
	}
	for _, dev := range f.ids {
		if _, ok := wave[dev]; !ok {
			f.minute(dev, f.v1, 4, 100, time.Millisecond, 0.2)
		}
	}
	f.clk.set(at(4, 45)) // soak over; minute 5 has not begun
	for dev, gen := range wave {
		f.report(dev, gen, f.v2, at(4, 20))
	}
	var s rollout.Status
	f.wait("the gate to wait for data", func() (bool, string) {
		// Status reads the rollout, its waves and its history one after
		// another: wait until all of them show the wait.
		s = f.status(id)
		return strings.Contains(fmt.Sprint(s.History), "gates wait for their data") && strings.Contains(latencyVerdict(s, 0).Detail, "insufficient data: 0"),
			fmt.Sprintf("%s %q %+v", s.Phase, s.Reason, latencyVerdict(s, 0))
	})
	v := latencyVerdict(s, 0)
	if s.Phase != rollout.PhaseRunning || s.Waves[0].State != rollout.WaveRunning || v.Result != rollout.Inconclusive ||
		!strings.Contains(v.Detail, "insufficient data: 0 latency samples of 2.0.0") {
		t.Fatalf("rollout %s %q; verdict %+v", s.Phase, s.Reason, v)
	}
	for dev := range wave {
		f.minute(dev, f.v2, 5, 100, 3*time.Millisecond, 0.2)
	}
	for _, dev := range f.ids {
		if _, ok := wave[dev]; !ok {
			f.minute(dev, f.v1, 5, 100, time.Millisecond, 0.2)
		}
	}
	f.clk.set(at(5, 30))
	f.e.DeviceChanged(f.ids[0])
	f.wait("the latency gate to stop the rollout", func() (bool, string) {
		s = f.status(id)
		return s.Phase == rollout.PhaseRollingBack, fmt.Sprintf("%s %q", s.Phase, s.Reason)
	})
}

// TestLatencyGateFallsBackToTheWaveBeforeItUpdated: with one wave there
// is no device outside it; the baseline is the wave's own minutes of
// 1.0.0 that ended before the wave began, without the install minutes
// (minute 1, and minute 0 of the downloads): minute 2 only. The verdict
// says so.
func TestLatencyGateFallsBackToTheWaveBeforeItUpdated(t *testing.T) {
	t.Parallel()
	f := startLatencyFleet(t, 6)
	id := f.create(fmt.Sprintf(latencySpec, `["100%"]`))
	wave := f.wave(6)
	f.update(wave, id, 3*time.Millisecond)
	var s rollout.Status
	f.wait("the latency gate to stop the rollout", func() (bool, string) {
		s = f.status(id)
		return s.Phase != rollout.PhaseRunning, fmt.Sprintf("%s %q", s.Phase, s.Reason)
	})
	v := latencyVerdict(s, 0)
	if s.Phase != rollout.PhaseRollingBack || v.Result != rollout.Fail ||
		!strings.Contains(v.Detail, "600 samples on 6 devices vs 600 on the same devices before the wave (fallback: no device outside the wave ran 1.0.0 in the same minutes)") {
		t.Fatalf("rollout %s %q; verdict %+v", s.Phase, s.Reason, v)
	}
	if r := figure(v, "p95Ratio"); r < 2.5 {
		t.Errorf("p95 ratio %.2f, want about 3: %s", r, v.Detail)
	}
}

func figure(v rollout.Verdict, name string) float64 {
	for _, f := range v.Figures {
		if f.Name == name {
			return f.Value
		}
	}
	return -1
}
