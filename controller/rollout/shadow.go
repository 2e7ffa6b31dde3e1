package rollout

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Shadow phases of waves gated on shadowAgreement.
//
// A wave whose gates include shadowAgreement does not switch its devices
// to the new version at once. Its desired states carry a ShadowPolicy with
// hold set: each agent loads the new version beside the one it runs,
// copies live inputs to it, compares the answers (never returning the
// candidate's) and reports the figures in SlotState.shadow, without
// switching by itself. The engine sums the figures of the wave's devices
// (reportedShadow, the gate's ShadowSource), and:
//
//	gate passes (agreement >= min over >= minInferences comparisons, summed over the wave)
//	    -> the pass is recorded in the wave's verdicts, and every device in
//	       shadow is sent the version again without a shadow policy: the
//	       switch (ACTIVATED, then the usual soak and health watch);
//	       devices notified later get no shadow phase
//	gate fails (agreement below the floor)
//	    -> the rollout fails as for any gate (rollback, or stop under
//	       onFailure stop): no device ever served the new version
//	gate inconclusive
//	    -> devices in shadow wait (their step deadline does not count
//	       while the gate decides) until the deadline of one of them
//	       passes: then the wave is held and the rollout paused; resume
//	       switches the wave anyway, rollback or abort stops it
//
// The pass recorded in the wave's verdicts is what says the wave switched,
// so a controller restarted at any moment knows it (it is committed with
// the switch's desired states), and the gate answers that recorded pass
// from then on: once switched, devices no longer report a shadow phase
// under way.

// shadowWaitDetail is the detail of a device in shadow.
const shadowWaitDetail = "in shadow beside the running version; the wave's shadowAgreement gate decides the switch"

// shadowMemo caches whether a wave's stored verdicts hold a shadow pass.
type shadowMemo struct {
	verdicts []byte
	passed   bool
	figures  [2]int // agreed, compared of the recorded pass
	at       time.Time
}

// shadowGates returns the shadowAgreement gates of plan wave i; late
// joiners (after the last wave) get the version without a shadow phase.
func (r *run) shadowGates(i int) []GateSpec {
	if i < 0 || i >= len(r.waves) {
		return nil
	}
	var out []GateSpec
	for _, g := range r.waveSpec(i).Gates {
		if g.Type == GateShadowAgreement {
			out = append(out, g)
		}
	}
	return out
}

// shadowState reads the stored verdicts of wave i: whether its shadow
// gate passed (and with which figures), and when its shadow verdict was
// last written.
func (r *run) shadowState(i int) *shadowMemo {
	w := r.waves[i]
	m := &w.shadow
	if m.verdicts != nil && bytes.Equal(m.verdicts, w.rec.Verdicts) {
		return m
	}
	*m = shadowMemo{verdicts: bytes.Clone(w.rec.Verdicts)}
	if m.verdicts == nil {
		m.verdicts = []byte{}
	}
	if !bytes.Contains(w.rec.Verdicts, []byte(GateShadowAgreement)) {
		return m
	}
	var vs []Verdict
	if json.Unmarshal(w.rec.Verdicts, &vs) != nil {
		return m
	}
	for _, v := range vs {
		if v.Gate != GateShadowAgreement {
			continue
		}
		if at, err := time.Parse(time.RFC3339Nano, v.At); err == nil && at.After(m.at) {
			m.at = at
		}
		if v.Result != Pass {
			continue
		}
		m.passed = true
		var rate float64
		for _, f := range v.Figures {
			switch f.Name {
			case "compared":
				m.figures[1] = int(f.Value)
			case "agreement":
				rate = f.Value
			}
		}
		m.figures[0] = int(math.Round(rate * float64(m.figures[1])))
	}
	return m
}

// shadowSwitched reports whether wave i is past its shadow phase: its
// shadow gate passed, or an operator resumed it past inconclusive gates.
func (r *run) shadowSwitched(i int) bool {
	if i < 0 || i >= len(r.waves) {
		return true
	}
	return r.waves[i].rec.Override || r.shadowState(i).passed
}

// shadowPolicy is the shadow phase wave i's desired states ask for: held,
// as strict as its strictest shadow gate; nil once the wave switched or
// when it has no shadow gate.
func (r *run) shadowPolicy(i int) *store.ShadowPolicy {
	gates := r.shadowGates(i)
	if len(gates) == 0 || r.shadowSwitched(i) {
		return nil
	}
	p := &store.ShadowPolicy{Hold: true}
	need := 0
	for _, g := range gates {
		p.MinAgreement = max(p.MinAgreement, g.Min)
		need = max(need, g.MinInferences)
		if g.Tolerance > 0 && (p.Tolerance == 0 || g.Tolerance < p.Tolerance) {
			p.Tolerance = g.Tolerance
		}
	}
	// Each device reports its figures as soon as it has its share of the
	// comparisons the gate needs (and again at twice that, ...).
	size := max(1, r.waves[i].rec.Size)
	p.MinInferences = uint32(max(1, (need+size-1)/size))
	return p
}

// shadowOf returns the figures of the shadow phase d runs for r, nil when
// it runs none: the device took the desired state r issued it, and its
// slot holds r's version as a candidate under way (pending), not as a
// finished one.
func (e *Engine) shadowOf(r *run, d *dev) *pb.ShadowState {
	o := e.obs[d.rec.DeviceID]
	if o == nil || !o.known || o.gen < d.rec.Generation || d.rec.Generation == 0 {
		return nil
	}
	ss := o.slots[r.ro.Slot]
	if ss.shadow == nil || ss.pending.GetBundleSha256() != r.model.Digest || ss.shadow.GetCandidate().GetBundleSha256() != r.model.Digest {
		return nil
	}
	return ss.shadow
}

// shadowWaits reports whether d is in a shadow phase and has not been
// sent its switch: its step deadline does not run meanwhile (shadowWave
// pauses the rollout instead when it passes with the gate undecided, and
// gives the device a fresh deadline with its switch).
func (e *Engine) shadowWaits(r *run, d *dev) bool {
	return d.step.preActivation() && len(r.shadowGates(d.rec.Wave)) > 0 && e.shadowOf(r, d) != nil
}

// reportedShadow is the engine's ShadowSource: the shadow figures the
// wave's devices report, summed.
type reportedShadow struct{ e *Engine }

// ShadowAgreement sums the comparisons the wave's devices report for the
// rollout's version; once the wave switched, it answers the figures of
// the recorded pass.
func (s reportedShadow) ShadowAgreement(_ context.Context, in *GateInput) (agreed, compared int, err error) {
	r := s.e.runs[in.RolloutID]
	if r == nil || in.Wave >= len(r.waves) {
		return 0, 0, fmt.Errorf("rollout %s wave %d is not running on this controller", in.RolloutID, in.Wave+1)
	}
	if m := r.shadowState(in.Wave); m.passed {
		return m.figures[0], m.figures[1], nil
	}
	for _, d := range r.byWave[in.Wave] {
		if sh := s.e.shadowOf(r, d); sh != nil {
			agreed += int(min(sh.GetAgreed(), sh.GetCompared()))
			compared += int(sh.GetCompared())
		}
	}
	return agreed, compared, nil
}

// shadowSource is the source of the shadowAgreement gate: Options.Shadow,
// or what the devices report.
func (e *Engine) shadowSource() ShadowSource {
	if e.o.Shadow != nil {
		return e.o.Shadow
	}
	return reportedShadow{e}
}

// shadowWave runs the shadow phase of wave i (see the top of this file).
// It reports whether the rollout stopped advancing on it this pass: the
// gate failed (the rollout failed) or stayed undecided too long (paused).
func (e *Engine) shadowWave(ctx context.Context, r *run, i int, now time.Time) bool {
	gates := r.shadowGates(i)
	if len(gates) == 0 || r.phase() != PhaseRunning {
		return false
	}
	w := r.waves[i]
	if !r.shadowSwitched(i) {
		in := e.gateInput(r, i, now, false)
		var vs []Verdict
		res := Pass
		for _, gs := range gates {
			v := Verdict{Gate: gs.Type, Result: Inconclusive}
			if f := e.gates[gs.Type]; f == nil {
				v.Detail = fmt.Sprintf("no gate of type %q in this controller", gs.Type)
			} else if g, err := f(gs); err != nil {
				v.Detail = err.Error()
			} else {
				v = g.Evaluate(ctx, in)
				v.Gate = gs.Type
			}
			v.At = now.UTC().Format(time.RFC3339Nano)
			vs = append(vs, v)
			switch {
			case v.Result == Fail:
				res = Fail
			case v.Result == Inconclusive && res == Pass:
				res = Inconclusive
			}
		}
		waiting, late := 0, false
		for _, d := range r.byWave[i] {
			if e.shadowOf(r, d) == nil || !d.step.preActivation() {
				continue
			}
			waiting++
			if !d.rec.Deadline.IsZero() && !now.Before(d.rec.Deadline) {
				late = true
			}
			if d.rec.Detail != shadowWaitDetail {
				d.rec.Detail = shadowWaitDetail
				r.markDev(d)
			}
		}
		switch res {
		case Fail:
			e.setShadowVerdicts(r, w, vs)
			e.fail(ctx, r, now, fmt.Sprintf("gate failed in wave %d: %s", i+1, pick(vs, Fail)))
			return true
		case Inconclusive:
			// Written when it changes, and at most every gate interval
			// while the figures grow: each write is a commit.
			if m := r.shadowState(i); m.at.IsZero() || !now.Before(m.at.Add(e.o.GateInterval)) || late {
				e.setShadowVerdicts(r, w, vs)
			}
			if late {
				r.setWave(w, WaveHeld, now)
				r.setPhase(PhasePaused, now, fmt.Sprintf("shadow phase of wave %d undecided at a device's deadline: %s; resume to switch the wave anyway, or roll it back",
					i+1, pick(vs, Inconclusive)))
				return true
			}
			return false
		}
		e.setShadowVerdicts(r, w, vs)
		r.note(now, "wave %d passed its shadow phase (%s); switching the %d devices in shadow", i+1, pick(vs, Pass), waiting)
	}
	// The switch: the version again, without a shadow policy, to every
	// device still in shadow that took its last desired state.
	health := r.health(i)
	for _, d := range r.byWave[i] {
		if !d.step.preActivation() || e.shadowOf(r, d) == nil {
			continue
		}
		r.desired = append(r.desired, store.SlotChange{DeviceID: d.rec.DeviceID, Slot: r.ro.Slot, Set: &store.DesiredSlot{
			Model: r.model.Name, Version: r.model.Version, Digest: r.model.Digest, Size: r.model.Size,
			RolloutID: r.ro.ID, Health: health,
		}})
		d.rec.Deadline = now.Add(r.deadline())
		d.rec.Detail = "switching after the shadow phase"
		r.markDev(d)
	}
	return false
}

// setShadowVerdicts replaces the shadow verdicts among wave w's stored
// ones with vs, keeping the other gates'.
func (e *Engine) setShadowVerdicts(r *run, w *wave, vs []Verdict) {
	var old []Verdict
	if len(w.rec.Verdicts) > 0 {
		_ = json.Unmarshal(w.rec.Verdicts, &old)
	}
	out := make([]Verdict, 0, len(old)+len(vs))
	for _, v := range old {
		if v.Gate != GateShadowAgreement {
			out = append(out, v)
		}
	}
	out = append(out, vs...)
	e.setVerdicts(r, w, out)
}
