package controller

import (
	"testing"

	"github.com/edgefleet/edgefleet/controller/api"
	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	"github.com/edgefleet/edgefleet/controller/rollout"
)

// TestRolloutLateReportsAreNoFailure rolls out to agents that, once they
// activated the new version, send reports from before the activation
// again, as an agent does after its connection dropped (it re-sends what
// the broker had not acknowledged; under load at 10,000 simulated devices
// hundreds do): a state still showing the version pending, and a
// download failure it had retried. Neither is the device going back or
// failing its health watch: the rollout succeeds with no failure.
func TestRolloutLateReportsAreNoFailure(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(2, "ok", all, nil)
	f.addAgents(3, "late", all, map[string]testdevice.Behavior{"2.0.0": {LateReports: true}})
	f.createRollout(`{"name":"late","selector":"fleet=a","model":"m@2.0.0",
		"strategy":{"waves":["100%"],"soak":"1500ms"}}`)
	r := f.waitRollout("late", "finished", func(r api.Rollout) bool {
		switch rollout.Phase(r.Phase) {
		case rollout.PhaseSucceeded, rollout.PhaseRolledBack, rollout.PhaseAborted:
			return true
		}
		return false
	})
	if r.Phase != string(rollout.PhaseSucceeded) || r.Failures != 0 {
		t.Fatalf("rollout %s with %d failures: %s", r.Phase, r.Failures, r.Reason)
	}
	for id, a := range f.agents {
		if a.Active() != "2.0.0" {
			t.Errorf("agent %s runs %q, want 2.0.0", id, a.Active())
		}
	}
}
