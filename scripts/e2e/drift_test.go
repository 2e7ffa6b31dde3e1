package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/fleet/sim"
	"github.com/edgefleet/edgefleet/models/compiler"
)

// fraudScoreWithReference builds fraud-score at version with its drift
// reference taken from the traffic the simulated devices send, shifted by
// shift (nil: unshifted). A simulated device scores its model's golden
// test inputs, picked at random; the compiler makes the first
// compiler.DefaultTests rows of the example's inputs.csv the golden
// vectors, so a reference of those rows, each repeated alike, is the live
// distribution itself: PSI near 0. Shifted, the reference describes
// traffic the devices do not see: the live outputs have drifted from it.
func fraudScoreWithReference(t *testing.T, version string, shift func(row []float32)) []byte {
	t.Helper()
	spec, err := compiler.ReadSpec(filepath.Join("..", "..", "models", "examples", "fraud-score"))
	if err != nil {
		t.Fatal(err)
	}
	spec.Version = version
	m, err := spec.Load()
	if err != nil {
		t.Fatal(err)
	}
	o, err := spec.Options()
	if err != nil {
		t.Fatal(err)
	}
	ref := &compiler.Table{Source: "live traffic", Columns: o.TestInputs.Columns}
	for range 25 {
		for _, row := range o.TestInputs.Rows[:compiler.DefaultTests] {
			r := slices.Clone(row)
			if shift != nil {
				shift(r)
			}
			ref.Rows = append(ref.Rows, r)
			ref.Lines = append(ref.Lines, len(ref.Rows))
		}
	}
	o.Reference = ref
	r, err := compiler.Compile(m, o)
	if err != nil {
		t.Fatal(err)
	}
	if r.Bundle.Manifest.Reference == nil || len(r.Bundle.Manifest.Reference.Outputs) == 0 {
		t.Fatal("the bundle has no output reference")
	}
	data, err := r.Bundle.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// riskier shifts a transaction (amount, hour, merchant_risk, distance_km,
// txn_last_24h, card_age_days) towards fraud.
func riskier(row []float32) {
	row[0] *= 20
	row[2] = 0.97
	row[3] = 800
	row[4] = 12
	row[5] = 2
}

// TestDriftGateStopsRollout: devices send their inference aggregates (on
// the manifest's bins, every 2 s). Against a reference of the very traffic
// they see, the controller's PSI stays under 0.2; a rollout of a version
// whose reference is shifted soaks under a drift gate (maxDriftPSI: 0.2),
// the wave's PSI crosses the threshold, the gate fails, and the rollout
// stops and rolls back.
func TestDriftGateStopsRollout(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	opts := sim.Options{Labels: simLabels(t, "fleet=sim"), Seed: 11, Rate: 20,
		Configure: func(_ *sim.Agent, cfg *agent.Config) { cfg.AggregateInterval = 2 * time.Second }}
	f := startRolloutFleet(t, 8, "fraud-score", opts)
	ctx := context.Background()
	for v, shift := range map[string]func([]float32){"1.1.0": nil, "2.0.0": riskier} {
		if _, err := f.client.PushModel(ctx, fraudScoreWithReference(t, v, shift)); err != nil {
			t.Fatal(err)
		}
	}
	// 1.1.0's reference is the live traffic: no drift.
	if _, err := f.client.Assign(ctx, client.Assignment{Model: "fraud-score", Version: "1.1.0", Selector: "fleet=sim"}); err != nil {
		t.Fatal(err)
	}
	f.waitRunning("fraud-score@1.1.0", f.online...)
	var base *client.TelemetryDrift
	f.eventually("aggregates of 1.1.0 with outputs", time.Minute, func() (bool, string) {
		s, err := f.client.Telemetry(ctx, client.TelemetryQuery{Model: "fraud-score", Version: "1.1.0", Since: "5m"})
		if err != nil || len(s.Groups) == 0 || s.Groups[0].Drift == nil || s.Groups[0].Drift.Observed < 200 {
			return false, fmt.Sprintf("%+v, %v", s, err)
		}
		base = s.Groups[0].Drift
		return true, ""
	})
	t.Logf("1.1.0 (reference = live traffic): %d outputs, PSI %.3f, JS %.3f", base.Observed, base.MaxOutputPSI, base.MaxOutputJS)
	if base.MaxOutputPSI >= 0.2 {
		t.Fatalf("PSI of 1.1.0 against its own traffic is %.3f; want under 0.2", base.MaxOutputPSI)
	}

	_, err := f.client.CreateRollout(ctx, client.RolloutSpec{Name: "drift", Selector: "fleet=sim", Model: "fraud-score@2.0.0",
		Strategy: client.RolloutStrategy{
			Waves: []client.WaveSpec{{Size: "50%"}, {Size: "100%"}}, Soak: "8s", FailureBudget: "10%",
			Gates: []client.GateSpec{{Type: "drift", MaxDriftPSI: 0.2, MinInferences: 100}},
		}})
	if err != nil {
		t.Fatal(err)
	}
	r := f.waitRollout("drift", "stopped by the drift gate", 90*time.Second, func(r *client.Rollout) bool { return r.Finished() })
	if r.Phase != "rolled-back" || r.Waves[0].State != "failed" || !strings.Contains(r.Reason, "drift") {
		t.Fatalf("rollout = %+v", r)
	}
	// The figures behind the verdict, from the API: the wave's PSI.
	w, err := f.client.Telemetry(ctx, client.TelemetryQuery{Rollout: "drift", Wave: 0, Since: "5m"})
	if err != nil || len(w.Groups) != 1 || w.Groups[0].Drift == nil {
		t.Fatalf("wave telemetry = %+v, %v", w, err)
	}
	d := w.Groups[0].Drift
	t.Logf("2.0.0 on wave 0 (reference shifted): %d outputs, PSI %.3f, JS %.3f", d.Observed, d.MaxOutputPSI, d.MaxOutputJS)
	if d.MaxOutputPSI <= 0.2 {
		t.Fatalf("PSI of the drifted version %.3f; want above 0.2", d.MaxOutputPSI)
	}
	code, out, _ := f.fleetCmd(30*time.Second, "telemetry", "--rollout", "drift", "--wave", "0", "--since", "5m")
	if code != 0 || !strings.Contains(out, "fraud-score@2.0.0") {
		t.Fatalf("fleet telemetry: %d\n%s", code, out)
	}
	t.Logf("%s", out)
}
