package rollout_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/rollout"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// syncBuffer is a log sink the engine's goroutine and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestWaveNotifiedInBatchesAndDecisionTimed runs a wave larger than
// NotifyBatch: its start and first devices go out in one commit, the rest
// in the commits right after, with no news in between. Each wave decision
// is timed from the receipt of the report that finished the wave, which
// the engine is told (DeviceReported), to its commit.
func TestWaveNotifiedInBatchesAndDecisionTimed(t *testing.T) {
	clk := &clock{t: lt0}
	f := newFleet(t, 12, clk.Now)
	logs := &syncBuffer{}
	reg := metrics.NewRegistry()
	f.start(rollout.Options{Now: clk.Now, MaxSleep: 20 * time.Millisecond, NotifyBatch: 5, Metrics: reg,
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	id := f.create(`{"name":"batches","selector":"fleet=t","model":"m@2.0.0",
		"strategy":{"waves":["25%","100%"],"soak":"0s","deadline":"1h"}}`)

	first := f.notified(id, 3)
	// The devices report the new version active and healthy; the last
	// report came in 1.5 s before the engine's clock reads now.
	healthy := func(ids []string, received time.Time) {
		for _, dev := range ids {
			s := &pb.SlotState{Slot: "default", Active: ref(f.v2), Healthy: true, ActiveSinceUnixMs: received.UnixMilli()}
			if err := f.inv.State(t.Context(), dev, received, &pb.ReportedState{Slots: []*pb.SlotState{s}, Health: pb.Health_HEALTH_OK}); err != nil {
				t.Fatal(err)
			}
			f.e.DeviceReported(dev, received)
		}
	}
	clk.set(lt0.Add(10 * time.Second))
	healthy(first, lt0.Add(8500*time.Millisecond))

	rest := f.notified(id, 12)
	f.wait("wave 2 started", func() (bool, string) {
		s := f.status(id)
		return s.Wave == 1, fmt.Sprint(s.Steps)
	})
	// Nine devices, five a commit: the decision went out with five.
	decided := regexp.MustCompile(`msg="rollout wave decided" rollout=\S+ wave=(\d) next="([^"]*)" decision_ms=(\d+) issued=(\d+)`)
	var got [][]string
	f.wait("the wave 1 decision logged", func() (bool, string) {
		got = decided.FindAllStringSubmatch(logs.String(), -1)
		return len(got) == 1, logs.String()
	})
	if w, next, ms, issued := got[0][1], got[0][2], got[0][3], got[0][4]; w != "1" || next != "wave 2 running" || ms != "1500" || issued != "5" {
		t.Fatalf("decision logged as wave=%s next=%q decision_ms=%s issued=%s; want wave 1, wave 2 running, 1500 ms, 5 issued", w, next, ms, issued)
	}
	if d := f.status(id).Waves[1].DecidedAfter; d >= 0 {
		t.Fatalf("wave 2, still running, has a decision latency of %v", d)
	}

	// The second wave finishes on reports received at 20 s; the engine
	// reads its clock at 20.2 s.
	var wave2 []string
	for _, dev := range rest {
		if !slices.Contains(first, dev) {
			wave2 = append(wave2, dev)
		}
	}
	clk.set(lt0.Add(20200 * time.Millisecond))
	healthy(wave2, lt0.Add(20*time.Second))
	f.wait("succeeded", func() (bool, string) {
		s := f.status(id)
		return s.Phase == rollout.PhaseSucceeded, string(s.Phase)
	})
	f.wait("the wave 2 decision logged", func() (bool, string) {
		got = decided.FindAllStringSubmatch(logs.String(), -1)
		return len(got) == 2, logs.String()
	})
	if w, next, ms := got[1][1], got[1][2], got[1][3]; w != "2" || next != "rollout succeeded" || ms != "200" {
		t.Fatalf("decision logged as wave=%s next=%q decision_ms=%s; want wave 2, rollout succeeded, 200 ms", w, next, ms)
	}

	// Both are stored with their waves, for the status.
	f.wait("decisions stored", func() (bool, string) {
		s := f.status(id)
		return s.Waves[0].DecidedAfter == 1500*time.Millisecond && s.Waves[1].DecidedAfter == 200*time.Millisecond,
			fmt.Sprint(s.Waves[0].DecidedAfter, s.Waves[1].DecidedAfter)
	})

	var text strings.Builder
	if err := reg.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`edgefleet_controller_rollout_wave_decision_seconds_sum (\S+)\nedgefleet_controller_rollout_wave_decision_seconds_count (\d+)`).FindStringSubmatch(text.String())
	if m == nil {
		t.Fatalf("no decision histogram in\n%s", text.String())
	}
	if sum, _ := strconv.ParseFloat(m[1], 64); m[2] != "2" || sum < 1.69 || sum > 1.71 {
		t.Fatalf("decision histogram: count %s sum %s, want 2 and 1.7", m[2], m[1])
	}
}

// notified waits until n devices of rollout id were sent 2.0.0 and
// returns them.
func (f *fleet) notified(id string, n int) []string {
	f.t.Helper()
	var out []string
	f.wait(fmt.Sprintf("%d devices notified", n), func() (bool, string) {
		out = out[:0]
		devs, err := f.e.Devices(f.t.Context(), id)
		if err != nil {
			return false, err.Error()
		}
		for _, d := range devs {
			if d.Step != rollout.StepPending {
				out = append(out, d.Device)
			}
		}
		return len(out) == n, fmt.Sprint(len(out))
	})
	return out
}

// TestFirstWaveLargerThanTheBatch: a rollout whose first wave is larger
// than NotifyBatch, created with the engine otherwise asleep for a minute,
// notifies the rest of the wave right after the commit that created it,
// without waiting for news or a timer.
func TestFirstWaveLargerThanTheBatch(t *testing.T) {
	clk := &clock{t: lt0}
	f := newFleet(t, 8, clk.Now)
	f.start(rollout.Options{Now: clk.Now, MaxSleep: time.Minute, GateInterval: time.Hour, NotifyBatch: 2})
	id := f.create(`{"name":"big-first","selector":"fleet=t","model":"m@2.0.0",
		"strategy":{"waves":["50%","100%"],"soak":"0s","deadline":"1h"}}`)
	start := time.Now()
	f.notified(id, 4)
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("the first wave's last devices were notified after %v", took)
	}
}
