package rollout

import (
	"context"
	"strings"
	"testing"
	"time"
)

func TestStepNames(t *testing.T) {
	seen := map[string]bool{}
	for _, s := range Steps() {
		name := s.String()
		if strings.HasPrefix(name, "Step(") || seen[name] {
			t.Fatalf("step %d has name %q", s, name)
		}
		seen[name] = true
		back, err := ParseStep(name)
		if err != nil || back != s {
			t.Fatalf("ParseStep(%q) = %v, %v", name, back, err)
		}
	}
	if _, err := ParseStep("dancing"); err == nil {
		t.Fatal("ParseStep accepted an unknown step")
	}
	if Step(99).String() != "Step(99)" {
		t.Fatal(Step(99).String())
	}
}

// TestStepTransitions checks the transition table against the rules the
// engine relies on.
func TestStepTransitions(t *testing.T) {
	for _, s := range Steps() {
		for _, to := range stepTransitions[s] {
			if to == s {
				t.Errorf("%s -> %s loops", s, to)
			}
		}
		// Every step a device was touched in can be rolled back.
		if s.touched() && s != StepRollingBack && !CanStep(s, StepRollingBack) {
			t.Errorf("%s cannot be rolled back", s)
		}
	}
	// Success comes only from activated: a device never counts as
	// succeeded on a download acknowledgement.
	for _, s := range Steps() {
		if CanStep(s, StepHealthy) != (s == StepActivated) {
			t.Errorf("CanStep(%s, healthy) = %v", s, CanStep(s, StepHealthy))
		}
	}
	for _, bad := range [][2]Step{{StepPending, StepActivated}, {StepHealthy, StepFailed}, {StepRolledBack, StepHealthy}, {StepFailed, StepActivated}} {
		if CanStep(bad[0], bad[1]) {
			t.Errorf("%s -> %s allowed", bad[0], bad[1])
		}
	}
	for _, p := range Phases() {
		if p.Terminal() && p != PhaseRolledBack && !CanPhase(p, PhaseRollingBack) {
			t.Errorf("finished phase %s cannot be rolled back", p)
		}
		if _, ok := phaseTransitions[p]; !ok {
			t.Errorf("phase %s has no transition list", p)
		}
	}
	if CanPhase(PhaseRolledBack, PhaseRunning) || CanPhase(PhaseSucceeded, PhaseRunning) {
		t.Error("a finished rollout can run again")
	}
}

func TestGates(t *testing.T) {
	ctx := context.Background()
	tel := newGateTelemetry(t)
	// Device a activated the new versions at 9:57; b, outside the wave,
	// runs 1.0.0 since long before. Their calls are in minute 9:59.
	m := gt0.Add(-time.Minute)
	tel.put("a", "2.0.0", m, 100, 10*time.Millisecond, 0, "")
	tel.put("outsider", "2.0.0", m, 100, time.Second, 2, "boom")
	tel.put("a", "2.1.0", m, 100, 40*time.Millisecond, 0, "")
	tel.put("a", "2.2.0", m, 90, 10*time.Millisecond, 3, "model trapped")
	tel.put("a", "2.2.0", m, 10, 0, 1, "inference timed out")
	tel.put("b", "1.0.0", m, 200, 10*time.Millisecond, 0, "")
	input := func(version string) *GateInput {
		return tel.input(version, map[string]time.Time{"a": gt0.Add(-3 * time.Minute)}, map[string]time.Time{"b": gt0.Add(-time.Hour)})
	}
	cases := []struct {
		name    string
		gate    Gate
		version string
		want    Result
		detail  string
	}{
		{"error rate passes, outsiders ignored", &ErrorRateGate{Max: 0.05, MinInferences: 20}, "2.0.0", Pass, "error rate 0.00% (0 errors, 0 timeouts in 100 inferences)"},
		{"error rate fails", &ErrorRateGate{Max: 0.05, MinInferences: 20}, "2.2.0", Fail, "error rate 40.00% (30 errors, 10 timeouts in 100 inferences) is above the ceiling 5.00%"},
		{"error rate needs data", &ErrorRateGate{Max: 0.05, MinInferences: 500}, "2.0.0", Inconclusive, "100 inferences on 2.0.0"},
		{"latency passes", &LatencyGate{MaxP99Ratio: 1.5, MaxP95Ratio: 1.2, MinInferences: 20}, "2.0.0", Pass, "p95 9.9ms on 2.0.0 vs 9.9ms on 1.0.0: x1.00 (limit x1.20); p99 9.9ms on 2.0.0 vs 9.9ms on 1.0.0: x1.00 (limit x1.50); 100 samples on 1 devices vs 200 on 1 devices outside the wave, same 1 minutes"},
		{"latency 4x fails", &LatencyGate{MaxP99Ratio: 1.5, MinInferences: 20}, "2.1.0", Fail, "p99 41.3ms on 2.1.0 vs 9.9ms on 1.0.0: x4.18 (limit x1.50) ABOVE LIMIT"},
		{"latency needs data", &LatencyGate{MaxP99Ratio: 1.5, MinInferences: 150}, "2.1.0", Inconclusive, "insufficient data: 100 latency samples of 2.1.0"},
		{"shadow without data", &ShadowAgreementGate{Min: 0.9}, "2.0.0", Inconclusive, "no data for the shadowAgreement gate"},
		{"drift without data", &DriftGate{Max: 0.2}, "2.0.0", Inconclusive, "no data for the drift gate"},
		{"drift with a source", &DriftGate{Max: 0.2, MinInferences: 10, Source: driftFunc(func() (float64, int) { return 0.5, 100 })}, "2.0.0", Fail, "drift 0.500 over 100 outputs is above 0.200"},
		{"shadow with a source", &ShadowAgreementGate{Min: 0.9, MinInferences: 10, Source: shadowFunc(func() (int, int) { return 95, 100 })}, "2.0.0", Pass, "agreement 95.00% in 100 comparisons"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := c.gate.Evaluate(ctx, input(c.version))
			if v.Result != c.want || !strings.Contains(v.Detail, c.detail) || v.Gate != c.gate.Name() {
				t.Fatalf("verdict = %+v, want %s with %q", v, c.want, c.detail)
			}
			if c.want != Inconclusive && len(v.Figures) == 0 {
				t.Fatal("no figures")
			}
		})
	}
}

type driftFunc func() (float64, int)

func (f driftFunc) Drift(context.Context, *GateInput) (float64, int, error) {
	s, n := f()
	return s, n, nil
}

type shadowFunc func() (int, int)

func (f shadowFunc) ShadowAgreement(context.Context, *GateInput) (int, int, error) {
	a, n := f()
	return a, n, nil
}

func TestQuantile(t *testing.T) {
	s := Samples{Latencies: []uint32{1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000}}
	for q, want := range map[float64]time.Duration{0.5: 5 * time.Millisecond, 0.95: 10 * time.Millisecond, 0.1: time.Millisecond, 0: time.Millisecond} {
		if got := s.Quantile(q); got != want {
			t.Errorf("Quantile(%v) = %v, want %v", q, got, want)
		}
	}
	if (Samples{}).Quantile(0.99) != 0 {
		t.Error("quantile of nothing")
	}
}
