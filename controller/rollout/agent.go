package rollout

import (
	"fmt"
	"strings"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
)

// Agent releases are rolled out as if they were a model: the release
// version v is the model release.Model@v (the registry stores that row when
// the release is pushed) in the pseudo slot release.Slot, so waves, gates,
// the failure budget, approvals, deadlines and rollback work unchanged.
// Two things are specific, both here:
//
//   - what a device runs in the pseudo slot is read from its reported agent
//     version and AgentUpdateState (agentSlot), not from its model slots;
//   - the director turns the pseudo slot of a desired state into
//     DesiredState.agent_release instead of a slot assignment.
//
// A device counts as succeeded on a release, as on a model, only when it
// reports the new version running and healthy (connected and reported
// after its restart, which is also what ends the agent watchdog's trial)
// through the soak window. A release the watchdog undoes is reported
// ROLLED_BACK by the restored agent, which fails the device's step.

// normalizeTarget checks what the rollout installs: a model into a slot,
// or an agent release.
func (s *Spec) normalizeTarget() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	if s.Agent != "" {
		if s.Model != "" {
			return bad("model %q and agent %q: a rollout installs a model or an agent release, not both", s.Model, s.Agent)
		}
		if !release.ValidVersion(s.Agent) {
			return bad("agent %q: give the agent release's version, e.g. 1.2.0", s.Agent)
		}
		if s.Slot != "" && s.Slot != release.Slot {
			return bad("slot %q: an agent release goes into no slot; leave slot out", s.Slot)
		}
		s.Slot = release.Slot
		return nil
	}
	name, version, ok := strings.Cut(s.Model, "@")
	if !ok || name == "" || version == "" || strings.Contains(version, "@") {
		return bad("model %q: write it as NAME@VERSION, e.g. grid-anomaly@1.1.0, or give an agent release with agent", s.Model)
	}
	if s.Slot == "" {
		s.Slot = DefaultSlot
	}
	if !slotRE.MatchString(s.Slot) {
		return bad("slot %q: use 1-63 lowercase letters, digits, '.', '_' or '-'", s.Slot)
	}
	return nil
}

// agentSlot is what a device runs in the pseudo slot release.Slot, from
// its reported state. An agent that does not report AgentUpdateState
// (built before self-update) is taken as healthy on its version.
func agentSlot(st *pb.ReportedState) (slotObs, bool) {
	v := st.GetAgentVersion()
	if v == "" {
		return slotObs{}, false
	}
	ref := func(v string) *pb.ModelRef {
		return &pb.ModelRef{Name: release.Model, Version: v, BundleSha256: release.Digest(v)}
	}
	so := slotObs{active: ref(v), healthy: true}
	if u := st.GetAgentUpdate(); u != nil {
		so.healthy = u.GetHealthy()
		so.lastError = u.GetLastError()
		if ms := u.GetSinceUnixMs(); ms > 0 {
			so.since = time.UnixMilli(ms)
		}
		if p := u.GetPending(); p != "" {
			so.pending = ref(p)
		}
	}
	return so, true
}
