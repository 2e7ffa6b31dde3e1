package deploy

import (
	"context"
	"fmt"
	"math"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// ShadowPolicyFrom is the shadow phase a desired state's pb.ShadowPolicy
// asks for. Its unset fields (zero, as proto3 sends them) take fallback's,
// the agent's own shadow configuration when it has one, and what both
// leave unset takes the defaults (ShadowPolicy's field comments).
func ShadowPolicyFrom(p *pb.ShadowPolicy, fallback *ShadowPolicy) ShadowPolicy {
	var out ShadowPolicy
	if fallback != nil {
		out = *fallback
	}
	if n := p.GetMinInferences(); n > 0 {
		out.MinInferences = n
	}
	if ms := p.GetMaxMs(); ms > 0 {
		out.MaxDuration = time.Duration(ms) * time.Millisecond
	}
	if a := p.GetMinAgreement(); a > 0 && a <= 1 {
		out.MinAgreement = a
	}
	if t := p.GetTolerance(); t > 0 && !math.IsInf(t, 0) {
		out.Tolerance = t
	}
	// Hold is the controller's alone: the agent's configuration cannot
	// hold a candidate, and a desired state without hold releases one.
	out.Hold = p.GetHold()
	return out.withDefaults()
}

// shadowPolicy is the shadow phase assignment a gets in slot, nil for
// none. The desired state's policy (SlotAssignment.shadow) wins; without
// one, Options.Shadow (the agent's configuration) decides. Assignments
// ordering a rollback, and slots with nothing active, never get one.
func (m *Manager) shadowPolicy(slot string, a *pb.SlotAssignment) *ShadowPolicy {
	if a.GetRollback() || m.activeRef(slot) == nil {
		return nil
	}
	var local *ShadowPolicy
	if m.o.Shadow != nil {
		local = m.o.Shadow(a)
	}
	if a.GetShadow() != nil {
		p := ShadowPolicyFrom(a.GetShadow(), local)
		return &p
	}
	if local == nil {
		return nil
	}
	p := local.withDefaults()
	p.Hold = false
	return &p
}

// keepShadowing decides what a desired state that assigns slot's shadow
// candidate c again (assignment a of generation gen) means: keep
// shadowing, on the terms a states (true), or switch now (false).
//
// It switches when a asks for no shadow phase, and when c was held and a
// no longer carries a shadow policy (what the agent's configuration would
// give it does not count): the controller judged the figures and orders
// the switch. A held candidate assigned with hold=false is judged by the
// agent from then on, against a's policy.
func (m *Manager) keepShadowing(slot string, c *candidate, a *pb.SlotAssignment, gen uint64) bool {
	p := m.shadowPolicy(slot, a)
	if p == nil {
		return false
	}
	old, _, _ := c.terms()
	if old.Hold && a.GetShadow() == nil {
		return false
	}
	if c.retarget(*p, a, gen) {
		m.log.Info("shadow terms changed by the desired state", "slot", slot, "version", c.l.ref.Version, "generation", gen,
			"hold", p.Hold, "min_inferences", p.MinInferences, "min_agreement", p.MinAgreement)
		m.o.Reporter.StateChanged()
		m.pokeHealth()
	}
	return true
}

// shadowStarted reports a candidate's shadow phase: a VERIFIED event (the
// bundle passed every check before the candidate was loaded) whose detail
// says it is in shadow, and on what terms.
func (m *Manager) shadowStarted(ctx context.Context, slot string, a *pb.SlotAssignment, gen uint64, active *Ref, p ShadowPolicy) {
	detail := "shadow phase started beside "
	if active != nil {
		detail += active.Version
	} else {
		detail += "the active version"
	}
	if p.Hold {
		detail += "; held: the controller judges the figures and orders the switch"
	} else {
		detail += shadowTerms(p)
	}
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_VERIFIED, Slot: slot, Model: a.GetModel(), Generation: gen,
		RolloutId: a.GetRolloutId(), Detail: detail, AtUnixMs: m.o.Now().UnixMilli()})
}

func shadowTerms(p ShadowPolicy) string {
	return fmt.Sprintf("; switching after %d compared inferences if agreement >= %.3f (judged after %s at the latest)",
		p.MinInferences, p.MinAgreement, p.MaxDuration)
}

// shadowReportDue reports whether a candidate's compared count n is one
// the controller should see at once (the state is otherwise re-published
// on the agent's state interval): the first comparison, then minimum,
// twice the minimum, four times, ... so a held wave reaches its gate's
// count without a state message per inference.
func shadowReportDue(n uint64, minimum uint32) bool {
	if n == 1 {
		return true
	}
	step := uint64(max(minimum, 1))
	for step <= n {
		if step == n {
			return true
		}
		step *= 2
	}
	return false
}

// proto is the wire form of the figures, for SlotState.shadow.
func (s ShadowStats) proto() *pb.ShadowState {
	us := func(d time.Duration) uint32 { return uint32(min(max(d.Microseconds(), 0), math.MaxUint32)) }
	return &pb.ShadowState{
		Candidate: s.Candidate.proto(), Compared: s.Compared, Agreed: s.Agreed, Errors: s.Errors,
		MaxScoreDiff: s.MaxScoreDiff, MeanScoreDiff: s.MeanScoreDiff,
		CandidateP99Us: us(s.CandidateP99), ActiveP99Us: us(s.ActiveP99), SinceUnixMs: s.Since.UnixMilli(),
	}
}
