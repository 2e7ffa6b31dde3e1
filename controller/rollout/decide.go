package rollout

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/selector"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
	"google.golang.org/protobuf/proto"
)

// run is one rollout the engine tracks, with the changes of the decision
// in progress (committed together by Engine.commit).
type run struct {
	ro    store.Rollout
	spec  Spec
	model store.Model
	sel   selector.Selector
	waves []*wave
	devs  []*dev
	byID  map[string]*dev
	// byWave holds each wave's devices in plan order; the index
	// len(waves) holds the late joiners.
	byWave map[int][]*dev

	// touched asks the engine to advance the rollout on its next pass.
	touched  bool
	wakeAt   time.Time
	lastGate time.Time
	// settling is set while the running wave's devices are done but a
	// gate waits for data that is due (Verdict.Wait): the end-of-wave
	// gates are asked again at settleNext.
	settling   bool
	settleNext time.Time

	dirtyRollout bool
	dirtyWaves   map[*wave]bool
	dirtyDevs    map[*dev]bool
	desired      []store.SlotChange
	history      []string
	// decisions are the waves this decision finished, reported once it is
	// committed; more is set when notify left devices of the running wave
	// for the next commit (Options.NotifyBatch).
	decisions []decision
	more      bool
}

// decision is a finished wave and when the news that finished it came in.
type decision struct {
	wave     int // index of the wave that passed
	evidence time.Time
}

type wave struct {
	rec   store.RolloutWave
	state WaveState
	// shadow caches what rec.Verdicts say of the shadow gate (shadow.go).
	shadow shadowMemo
}

type dev struct {
	rec  store.RolloutDevice
	step Step
	// failEvent is the detail of a FAILED event for the new version; the
	// device counts as failed once its state shows it gave up.
	failEvent string
	// sawNew is set once a reported state showed the new version active.
	// Only then does a state without it mean the device switched back: a
	// state snapshot taken before the activation can arrive after the
	// ACTIVATED event (states and events are separate messages), while
	// states themselves arrive in order.
	sawNew bool
	// news is when the controller learned what put the device in its
	// current step: the receipt of the report that moved it, the deadline
	// or the soak end that did. Zero when not known (loaded at start):
	// rec.StepAt stands in.
	news time.Time
}

// newsAt is when the device's current step became known.
func (d *dev) newsAt() time.Time {
	if d.news.IsZero() {
		return d.rec.StepAt
	}
	return d.news
}

func newRun(ro store.Rollout, spec Spec, m store.Model) *run {
	sel, _ := selector.Parse(spec.Selector) // checked by Normalize
	return &run{
		ro: ro, spec: spec, model: m, sel: sel,
		byID: map[string]*dev{}, byWave: map[int][]*dev{},
		dirtyWaves: map[*wave]bool{}, dirtyDevs: map[*dev]bool{},
	}
}

func (r *run) add(d *dev) {
	r.devs = append(r.devs, d)
	r.byID[d.rec.DeviceID] = d
	r.byWave[d.rec.Wave] = append(r.byWave[d.rec.Wave], d)
}

func (r *run) ids() []string {
	out := make([]string, len(r.devs))
	for i, d := range r.devs {
		out[i] = d.rec.DeviceID
	}
	return out
}

func (r *run) phase() Phase { return Phase(r.ro.Phase) }

// waveSpec returns the specification of plan wave i (the last one for the
// late joiners).
func (r *run) waveSpec(i int) WaveSpec {
	ws := r.spec.Strategy.Waves
	if i < len(r.waves) {
		return ws[r.waves[i].rec.SpecIndex]
	}
	return ws[len(ws)-1]
}

func (r *run) soak(i int) time.Duration {
	if s := r.waveSpec(i).Soak; s != nil {
		return s.D()
	}
	return 0
}

func (r *run) deadline() time.Duration { return r.spec.Strategy.Deadline.D() }

// stepDeadline is how long d may stay in its current step.
func (r *run) stepDeadline(d *dev) time.Duration {
	if d.step == StepActivated {
		return r.soak(d.rec.Wave) + r.deadline()
	}
	return r.deadline()
}

func (r *run) markDev(d *dev) { r.dirtyDevs[d] = true; r.touched = true }

func (r *run) markWave(w *wave) { r.dirtyWaves[w] = true; r.touched = true }

func (r *run) note(now time.Time, format string, a ...any) {
	r.history = append(r.history, fmt.Sprintf(format, a...))
	r.dirtyRollout = true
}

func (r *run) changed() bool {
	return r.dirtyRollout || len(r.dirtyWaves) > 0 || len(r.dirtyDevs) > 0 || len(r.desired) > 0 || len(r.history) > 0
}

// setPhase moves the rollout to p with reason; false if the transition is
// not one of the listed ones.
func (r *run) setPhase(p Phase, now time.Time, reason string) bool {
	if r.phase() == p {
		if r.ro.Reason != reason {
			r.ro.Reason = reason
			r.dirtyRollout = true
		}
		return true
	}
	if !CanPhase(r.phase(), p) {
		return false
	}
	r.ro.Phase, r.ro.Reason = string(p), reason
	if p.Terminal() {
		r.ro.FinishedAt = now
	} else {
		r.ro.FinishedAt = time.Time{}
	}
	msg := "phase " + string(p)
	if reason != "" {
		msg += ": " + reason
	}
	r.note(now, "%s", msg)
	return true
}

// setStep moves d to step to; false (and no change) if the transition is
// not one of the listed ones.
func (r *run) setStep(d *dev, to Step, now time.Time) bool {
	if !CanStep(d.step, to) {
		return false
	}
	d.step = to
	d.rec.StepAt = now
	switch {
	case to.Terminal() || to == StepPending:
		d.rec.Deadline = time.Time{}
	case to == StepActivated:
		d.rec.Deadline = d.rec.ActivatedAt.Add(r.soak(d.rec.Wave) + r.deadline())
	default:
		d.rec.Deadline = now.Add(r.deadline())
	}
	r.markDev(d)
	return true
}

func (r *run) setWave(w *wave, s WaveState, now time.Time) {
	if w.state == s {
		return
	}
	w.state = s
	switch s {
	case WaveRunning:
		if w.rec.StartedAt.IsZero() {
			w.rec.StartedAt = now
		}
	case WavePassed, WaveFailed, WaveStopped:
		w.rec.FinishedAt = now
	}
	r.markWave(w)
}

// commit builds the store commit of the pending changes.
func (r *run) commit(now time.Time, create bool) store.RolloutCommit {
	ro := r.ro
	ro.Revision++
	ro.UpdatedAt = now
	if create {
		ro.Revision = 1
	}
	c := store.RolloutCommit{Rollout: ro, Create: create, Desired: r.desired, History: r.history}
	for w := range r.dirtyWaves {
		rec := w.rec
		rec.State = string(w.state)
		c.Waves = append(c.Waves, rec)
	}
	slices.SortFunc(c.Waves, func(a, b store.RolloutWave) int { return cmp.Compare(a.Index, b.Index) })
	for d := range r.dirtyDevs {
		rec := d.rec
		rec.Step = d.step.String()
		c.Devices = append(c.Devices, rec)
	}
	slices.SortFunc(c.Devices, func(a, b store.RolloutDevice) int { return cmp.Compare(a.Order, b.Order) })
	return c
}

// committed records that c is stored.
func (r *run) committed(c store.RolloutCommit) {
	r.ro = c.Rollout
	r.dirtyRollout = false
	r.dirtyWaves = map[*wave]bool{}
	r.dirtyDevs = map[*dev]bool{}
	r.desired, r.history, r.decisions = nil, nil, nil
}

func (r *run) failures() (n int, why []string) {
	for _, d := range r.devs {
		if d.rec.Failure != "" && d.rec.Wave < len(r.waves) {
			n++
			if len(why) < 3 {
				why = append(why, d.rec.DeviceID+": "+d.rec.Failure)
			}
		}
	}
	return n, why
}

// observation is what the engine last read about a device.
type observation struct {
	// known is set once the device has reported a state.
	known  bool
	online bool
	// onlineSince is when the engine saw the device come online; zero if
	// it was online when first read.
	onlineSince time.Time
	gen         uint64
	slots       map[string]slotObs
}

type slotObs struct {
	active, pending *pb.ModelRef
	healthy         bool
	since           time.Time
	lastError       string
	// shadow is the shadow phase under way or last finished (shadow.go).
	shadow *pb.ShadowState
}

func observe(b store.DeviceBrief, prev *observation, now time.Time) *observation {
	o := &observation{online: b.Online, gen: b.ReportedGeneration, slots: map[string]slotObs{}}
	if prev != nil {
		o.onlineSince = prev.onlineSince
		if b.Online && !prev.online {
			o.onlineSince = now
		}
	}
	if len(b.State) == 0 {
		return o
	}
	var st pb.ReportedState
	if err := proto.Unmarshal(b.State, &st); err != nil {
		return o // stored by the inventory; a bad one is logged there
	}
	o.known = true
	o.gen = st.GetDesiredGeneration()
	for _, s := range st.GetSlots() {
		so := slotObs{active: s.GetActive(), pending: s.GetPending(), healthy: s.GetHealthy(), lastError: s.GetLastError(), shadow: s.GetShadow()}
		if so.active != nil && so.active.GetBundleSha256() == "" && so.active.GetName() == "" {
			so.active = nil
		}
		if so.pending != nil && so.pending.GetBundleSha256() == "" && so.pending.GetName() == "" {
			so.pending = nil
		}
		if ms := s.GetActiveSinceUnixMs(); ms > 0 {
			so.since = time.UnixMilli(ms)
		}
		o.slots[s.GetSlot()] = so
	}
	if so, ok := agentSlot(&st); ok {
		o.slots[release.Slot] = so
	}
	return o
}

// activeIs reports whether the slot runs the bundle with digest.
func (s slotObs) activeIs(digest string) bool {
	return s.active != nil && s.active.GetBundleSha256() == digest
}

func (r *run) activate(d *dev, at, now time.Time) {
	if at.IsZero() || at.After(now) {
		at = now
	}
	if at.Before(d.rec.StepAt) {
		at = d.rec.StepAt
	}
	d.rec.ActivatedAt = at
	if r.setStep(d, StepActivated, now) {
		d.rec.Detail = ""
	}
}

func describe(m *pb.ModelRef) string {
	if m == nil {
		return "no model"
	}
	return m.GetName() + "@" + m.GetVersion()
}

// applyObs moves d along what the device reports.
func (e *Engine) applyObs(r *run, d *dev, now time.Time) {
	o := e.obs[d.rec.DeviceID]
	if o == nil {
		return
	}
	if o.online && !o.onlineSince.IsZero() && d.step != StepPending && !d.step.Terminal() {
		// A device that just came back gets a whole deadline.
		if nd := o.onlineSince.Add(r.stepDeadline(d)); nd.After(d.rec.Deadline) {
			d.rec.Deadline = nd
			r.markDev(d)
		}
	}
	if !o.known {
		return
	}
	ss := o.slots[r.ro.Slot]
	processed := o.gen >= d.rec.Generation // the device took the rollout's desired state
	if ss.activeIs(r.model.Digest) {
		d.sawNew = true
	}
	switch {
	case d.step.preActivation():
		if ss.activeIs(r.model.Digest) {
			r.activate(d, ss.since, now)
		} else if d.failEvent != "" && processed && ss.pending == nil {
			if r.setStep(d, StepFailed, now) {
				d.rec.Failure = "failed on the device: " + d.failEvent
			}
		}
	case d.step == StepActivated || d.step == StepHealthy:
		// A state that still shows the version pending is no switch back:
		// it is older than the one that showed it active (an agent whose
		// connection dropped re-sends the reports the broker had not
		// acknowledged, after newer ones), or the device is on its way
		// to it again. A device that went back by itself gave it up.
		if !ss.activeIs(r.model.Digest) && ss.pending.GetBundleSha256() != r.model.Digest && d.sawNew && processed && r.phase().progressing() {
			if r.setStep(d, StepRolledBack, now) {
				d.rec.Failure = "the device switched back to " + describe(ss.active) + " by itself"
				if ss.lastError != "" {
					d.rec.Failure += ": " + ss.lastError
				}
			}
		}
	case d.step == StepRollingBack:
		if processed && r.restored(d, ss) {
			if r.setStep(d, StepRolledBack, now) {
				d.rec.Detail = "back on " + prevName(d)
			}
		}
	}
	r.touched = true
}

func prevName(d *dev) string {
	if d.rec.PrevModel == "" {
		return "no model"
	}
	return d.rec.PrevModel + "@" + d.rec.PrevVersion
}

// restored reports whether the slot is back to what d ran before.
func (r *run) restored(d *dev, ss slotObs) bool {
	if d.rec.PrevModel == "" {
		return ss.active == nil
	}
	return ss.activeIs(d.rec.PrevDigest)
}

// matches reports whether an event is about r's deployment to d.
func (r *run) matches(ev store.StoredEvent, d *dev) bool {
	if ev.Kind == "refused" {
		return d.rec.Generation != 0 && ev.Generation == d.rec.Generation
	}
	if ev.RolloutID != "" {
		return ev.RolloutID == r.ro.ID
	}
	return ev.Model == r.ro.Model && ev.Version == r.ro.Version && (ev.Slot == "" || ev.Slot == r.ro.Slot)
}

// applyEvent moves devices along an event they reported.
func (e *Engine) applyEvent(ev store.StoredEvent, now time.Time) {
	for _, r := range e.byDevice[ev.DeviceID] {
		d := r.byID[ev.DeviceID]
		if d == nil || !r.matches(ev, d) {
			continue
		}
		isNew := ev.Model == r.ro.Model && ev.Version == r.ro.Version
		switch ev.Kind {
		case "downloading":
			if d.step == StepNotified && isNew {
				r.setStep(d, StepDownloading, now)
			}
		case "verified":
			if (d.step == StepNotified || d.step == StepDownloading) && isNew {
				r.setStep(d, StepVerified, now)
			}
		case "activated":
			if d.step.preActivation() && isNew {
				r.activate(d, ev.At, now)
			}
		case "failed":
			if d.step == StepActivated && isNew && r.phase().progressing() {
				if ev.At.Before(d.rec.ActivatedAt) {
					// Stamped by the device before it activated the
					// version: a download or check that failed and was
					// retried, reported late (re-sent after a dropped
					// connection, or spooled); its retry succeeded.
					break
				}
				// After activation only the health watch fails a version:
				// the device had nothing to go back to and keeps serving it.
				if r.setStep(d, StepFailed, now) {
					d.rec.Failure = "failed its health watch on the device: " + ev.Detail
				}
				break
			}
			if d.step.preActivation() && isNew {
				d.failEvent = ev.Detail
				if d.failEvent == "" {
					d.failEvent = "no reason given"
				}
				d.rec.Detail = ev.Detail
				r.markDev(d)
				e.applyObs(r, d, now)
			}
		case "refused":
			if d.step.preActivation() && r.setStep(d, StepFailed, now) {
				d.rec.Failure = "the device refused the desired state: " + ev.Detail
			}
		case "rolled-back":
			if !r.phase().progressing() || ev.RolloutID != r.ro.ID {
				break
			}
			why := "rolled back on the device"
			if ev.Detail != "" {
				why += ": " + ev.Detail
			}
			switch {
			case d.step == StepActivated || d.step == StepHealthy:
				if r.setStep(d, StepRolledBack, now) {
					d.rec.Failure = why
				}
			case d.step.preActivation():
				if r.setStep(d, StepFailed, now) {
					d.rec.Failure = why
				}
			}
		}
		r.touched = true
	}
}

// advance makes every decision that is due for r; the caller commits.
func (e *Engine) advance(ctx context.Context, r *run, now time.Time) {
	e.timers(r, now)
	if r.phase().progressing() {
		if n, why := r.failures(); n > r.spec.Budget(r.ro.Targets) {
			e.fail(ctx, r, now, fmt.Sprintf("%d of %d devices failed, over the failure budget of %d (%s)",
				n, r.ro.Targets, r.spec.Budget(r.ro.Targets), strings.Join(why, "; ")))
		}
	}
	switch r.phase() {
	case PhaseRunning:
		e.runWaves(ctx, r, now)
	case PhasePaused, PhaseWaitingApproval:
		e.midGates(ctx, r, now)
	case PhaseRollingBack:
		left := 0
		for _, d := range r.devs {
			if d.step == StepRollingBack {
				left++
			}
		}
		if left == 0 {
			r.setPhase(PhaseRolledBack, now, r.ro.Reason)
		}
	}
	e.setOpen(r)
}

// setOpen decides whether the engine keeps tracking r.
func (e *Engine) setOpen(r *run) {
	open := true
	switch r.phase() {
	case PhaseAborted, PhaseRolledBack:
		open = false
	case PhaseSucceeded:
		open = false
		for _, d := range r.devs {
			if d.step != StepPending && !d.step.Terminal() {
				open = true
				break
			}
		}
	}
	if open != r.ro.Open {
		r.ro.Open = open
		r.dirtyRollout = true
	}
}

// timers handles soak ends and deadlines.
func (e *Engine) timers(r *run, now time.Time) {
	for _, d := range r.devs {
		if d.step == StepActivated {
			o := e.obs[d.rec.DeviceID]
			if o != nil {
				ss := o.slots[r.ro.Slot]
				soakEnd := d.rec.ActivatedAt.Add(r.soak(d.rec.Wave))
				if ss.activeIs(r.model.Digest) && ss.healthy && !now.Before(soakEnd) {
					news := d.newsAt()
					if r.setStep(d, StepHealthy, now) {
						d.rec.Detail = "healthy through the soak"
						// Healthy since the later of its activation's
						// report and the soak's end.
						d.news = news
						if soakEnd.After(news) {
							d.news = soakEnd
						}
					}
					continue
				}
			}
		}
		if d.step == StepPending || d.step.Terminal() || d.rec.Deadline.IsZero() || now.Before(d.rec.Deadline) {
			continue
		}
		if e.shadowWaits(r, d) {
			continue // its wave's shadow gate decides (shadowWave)
		}
		step, deadline := d.step, d.rec.Deadline
		e.deadlinePassed(r, d, now)
		if d.step != step {
			d.news = deadline
		}
	}
}

func (e *Engine) deadlinePassed(r *run, d *dev, now time.Time) {
	o := e.obs[d.rec.DeviceID]
	online := o != nil && o.online
	dl := r.stepDeadline(d)
	at := d.step
	if d.step == StepRollingBack {
		if r.setStep(d, StepTimedOut, now) {
			d.rec.Detail = fmt.Sprintf("did not confirm %s within %s; its desired state restores it when it reconnects", prevName(d), r.deadline())
		}
		return
	}
	if online {
		if r.setStep(d, StepTimedOut, now) {
			d.rec.Failure = fmt.Sprintf("online but still %s after %s", at, dl)
		}
		return
	}
	switch r.spec.Strategy.Unreachable {
	case UnreachableSkip:
		if r.setStep(d, StepSkipped, now) {
			d.rec.Detail = fmt.Sprintf("unreachable: offline when its %s deadline passed (%s); left out of the wave", at, dl)
		}
	case UnreachableWait:
		d.rec.Deadline = now.Add(r.deadline())
		d.rec.Detail = fmt.Sprintf("unreachable: offline at %s; the wave waits for it", at)
		r.markDev(d)
	default:
		if r.setStep(d, StepTimedOut, now) {
			d.rec.Failure = fmt.Sprintf("unreachable: offline when its %s deadline passed (%s)", at, dl)
		}
	}
}

// runWaves starts, feeds and finishes waves while the rollout runs.
func (e *Engine) runWaves(ctx context.Context, r *run, now time.Time) {
	for r.ro.Wave < len(r.waves) {
		i := r.ro.Wave
		w := r.waves[i]
		switch w.state {
		case WavePending, WaveWaitingApproval:
			if r.waveSpec(i).Approval && !w.rec.Approved {
				r.setWave(w, WaveWaitingApproval, now)
				r.setPhase(PhaseWaitingApproval, now, fmt.Sprintf("wave %d of %d (%d devices) waits for approval", i+1, len(r.waves), w.rec.Size))
				return
			}
			r.setWave(w, WaveRunning, now)
			r.lastGate, r.settling = now, false
			r.note(now, "wave %d of %d started: %d devices", i+1, len(r.waves), w.rec.Size)
		case WaveHeld:
			// Paused on inconclusive gates; resume overrides them.
			return
		}
		if err := e.notify(ctx, r, i, now); err != nil {
			e.log.Error("prepare notifications", "rollout", r.ro.ID, "wave", i, "err", err)
			return
		}
		if e.midGates(ctx, r, now) || e.shadowWave(ctx, r, i, now) {
			return
		}
		for _, d := range r.byWave[i] {
			if !d.step.Terminal() {
				return
			}
		}
		if r.settling && now.Before(r.settleNext) {
			return
		}
		verdicts := e.evaluate(ctx, r, i, now, true)
		e.setVerdicts(r, w, verdicts)
		if bad := pick(verdicts, Fail); len(bad) > 0 {
			r.settling = false
			e.fail(ctx, r, now, fmt.Sprintf("gate failed in wave %d: %s", i+1, bad))
			return
		}
		if doubt := pick(verdicts, Inconclusive); len(doubt) > 0 && !w.rec.Override {
			if due := waitFor(verdicts, now); !due.IsZero() {
				// Data that is due has not come yet (a latency gate
				// waits for the minute after the activations): ask
				// again soon rather than pausing for an operator.
				if !r.settling {
					r.note(now, "wave %d of %d: its devices are done; gates wait for their data until %s: %s", i+1, len(r.waves), due.UTC().Format(time.TimeOnly), doubt)
				}
				r.settling = true
				r.settleNext = minTime(now.Add(e.o.GateInterval), due)
				return
			}
			r.settling = false
			r.setWave(w, WaveHeld, now)
			r.setPhase(PhasePaused, now, fmt.Sprintf("gates inconclusive at the end of wave %d: %s; resume to go on anyway", i+1, doubt))
			return
		}
		r.settling = false
		r.setWave(w, WavePassed, now)
		r.note(now, "wave %d of %d passed", i+1, len(r.waves))
		d := decision{wave: i}
		for _, dv := range r.byWave[i] {
			if at := dv.newsAt(); at.After(d.evidence) {
				d.evidence = at
			}
		}
		r.decisions = append(r.decisions, d)
		r.ro.Wave++
		r.dirtyRollout = true
	}
	e.succeed(ctx, r, now)
}

// midGates checks the running wave's gates while it soaks; it reports
// whether one failed (and the rollout was failed).
func (e *Engine) midGates(ctx context.Context, r *run, now time.Time) bool {
	if r.ro.Wave >= len(r.waves) {
		return false
	}
	w := r.waves[r.ro.Wave]
	if w.state != WaveRunning || now.Before(r.lastGate.Add(e.o.GateInterval)) || len(r.waveSpec(r.ro.Wave).Gates) == 0 {
		return false
	}
	r.lastGate = now
	activated := false
	for _, d := range r.byWave[r.ro.Wave] {
		if !d.rec.ActivatedAt.IsZero() {
			activated = true
			break
		}
	}
	if !activated {
		return false
	}
	verdicts := e.evaluate(ctx, r, r.ro.Wave, now, false)
	e.setVerdicts(r, w, verdicts)
	if bad := pick(verdicts, Fail); len(bad) > 0 {
		e.fail(ctx, r, now, fmt.Sprintf("gate failed in wave %d: %s", r.ro.Wave+1, bad))
		return true
	}
	return false
}

// waitFor returns the latest time an inconclusive verdict waits for data
// that is still due after now; zero when none does.
func waitFor(vs []Verdict, now time.Time) time.Time {
	var due time.Time
	for _, v := range vs {
		if v.Result == Inconclusive && v.Wait.After(now) && v.Wait.After(due) {
			due = v.Wait
		}
	}
	return due
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func pick(vs []Verdict, res Result) string {
	var out []string
	for _, v := range vs {
		if v.Result == res {
			out = append(out, v.Gate+" ("+v.Detail+")")
		}
	}
	return strings.Join(out, "; ")
}

func (e *Engine) setVerdicts(r *run, w *wave, vs []Verdict) {
	b, err := json.Marshal(vs)
	if err != nil {
		return
	}
	if !bytes.Equal(b, w.rec.Verdicts) {
		w.rec.Verdicts = b
		r.markWave(w)
	}
}

// evaluate runs the gates of wave i.
func (e *Engine) evaluate(ctx context.Context, r *run, i int, now time.Time, final bool) []Verdict {
	specs := r.waveSpec(i).Gates
	if len(specs) == 0 {
		return nil
	}
	in := e.gateInput(r, i, now, final)
	out := make([]Verdict, 0, len(specs))
	for _, gs := range specs {
		f := e.gates[gs.Type]
		var g Gate
		var err error
		if f == nil {
			err = fmt.Errorf("no gate of type %q in this controller", gs.Type)
		} else {
			g, err = f(gs)
		}
		if err != nil {
			out = append(out, Verdict{Gate: gs.Type, Result: Inconclusive, Detail: err.Error()})
			continue
		}
		v := g.Evaluate(ctx, in)
		if v.Gate == "" {
			v.Gate = gs.Type
		}
		out = append(out, v)
	}
	return out
}

// gateInput is what the gates of wave i judge now.
func (e *Engine) gateInput(r *run, i int, now time.Time, final bool) *GateInput {
	in := &GateInput{
		RolloutID: r.ro.ID, Wave: i, Model: r.ro.Model, Version: r.ro.Version,
		Devices: map[string]bool{}, Activated: map[string]time.Time{}, Control: map[string]time.Time{},
		Since: r.waves[i].rec.StartedAt, Until: now, Final: final,
		telemetry: e.o.Store,
	}
	in.BaselineSince = in.Since.Add(-e.o.BaselineWindow)
	prev := map[string]int{}
	for _, d := range r.byWave[i] {
		if !d.rec.ActivatedAt.IsZero() {
			in.Devices[d.rec.DeviceID] = true
			in.Activated[d.rec.DeviceID] = d.rec.ActivatedAt
		}
		if d.rec.PrevModel == r.ro.Model && d.rec.PrevVersion != r.ro.Version {
			prev[d.rec.PrevVersion]++
		}
	}
	for v := range prev {
		in.Previous = append(in.Previous, v)
	}
	slices.SortFunc(in.Previous, func(a, b string) int {
		if c := cmp.Compare(prev[b], prev[a]); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	// The control cohort: the rollout's other devices that run one of
	// those versions now (later waves, devices rolled back), as they
	// last reported, with the time they activated it.
	for _, d := range r.devs {
		if d.rec.Wave == i {
			continue
		}
		o := e.obs[d.rec.DeviceID]
		if o == nil {
			continue
		}
		ss := o.slots[r.ro.Slot]
		if ss.active == nil || ss.active.GetName() != r.ro.Model || prev[ss.active.GetVersion()] == 0 {
			continue
		}
		in.Control[d.rec.DeviceID] = ss.since
	}
	return in
}

// laterBatches is how many times Options.NotifyBatch the commits after a
// wave's first may issue.
const laterBatches = 20

// notify issues the desired state to the pending devices of wave i, as
// many as the download cap and the batch allow.
func (e *Engine) notify(ctx context.Context, r *run, i int, now time.Time) error {
	if r.phase() != PhaseRunning && r.phase() != PhaseSucceeded {
		return nil
	}
	limit := r.spec.Strategy.MaxConcurrentDownloads
	if i >= len(r.waves) {
		limit = 0
	}
	inFlight, started := 0, false
	for _, d := range r.byWave[i] {
		if d.step.inFlight() {
			inFlight++
		}
		if d.step != StepPending {
			started = true
		}
	}
	// The commit that starts a wave (and carries the decision to) stays
	// small; the rest of the wave follows in larger ones, since every
	// commit rewrites the pages it touches (RATIONALE.md).
	batch := e.o.NotifyBatch
	if started {
		batch *= laterBatches
	}
	var picked []*dev
	for _, d := range r.byWave[i] {
		if d.step != StepPending {
			continue
		}
		if limit > 0 && inFlight >= limit {
			break
		}
		if len(picked) == batch {
			r.more = true // the rest in the commits that follow
			break
		}
		picked = append(picked, d)
		inFlight++
	}
	if len(picked) == 0 {
		return nil
	}
	// What each device runs is at hand for most: the engine keeps what
	// they report. The others (nothing reported in the slot yet) are read
	// with the desired slot they had, which is what a rollback restores.
	var need []string
	needed := map[string]bool{}
	for _, d := range picked {
		if o := e.obs[d.rec.DeviceID]; o == nil || o.slots[r.ro.Slot].active == nil {
			need = append(need, d.rec.DeviceID)
			needed[d.rec.DeviceID] = true
		}
	}
	briefs := map[string]store.DeviceBrief{}
	if len(need) > 0 {
		bs, err := e.o.Store.DeviceBriefs(ctx, r.ro.Slot, need)
		if err != nil {
			return err
		}
		for _, b := range bs {
			briefs[b.ID] = b
			e.obs[b.ID] = observe(b, e.obs[b.ID], now)
		}
	}
	health := r.health(i)
	prevModels := map[string]store.Model{}
	var err error
	for _, d := range picked {
		o := e.obs[d.rec.DeviceID]
		b, read := briefs[d.rec.DeviceID]
		if o == nil || (needed[d.rec.DeviceID] && !read) {
			if r.setStep(d, StepSkipped, now) {
				d.rec.Detail = "no longer in the inventory"
			}
			continue
		}
		// What to restore on a rollback: what the device runs, or else
		// what it was meant to run.
		var prev *pb.ModelRef
		if ss, ok := o.slots[r.ro.Slot]; ok && ss.active != nil {
			prev = ss.active
		} else if read && b.Desired != nil && b.Desired.RolloutID != r.ro.ID {
			prev = &pb.ModelRef{Name: b.Desired.Model, Version: b.Desired.Version, BundleSha256: b.Desired.Digest}
		}
		d.rec.PrevModel, d.rec.PrevVersion, d.rec.PrevDigest, d.rec.PrevSize = "", "", "", 0
		if prev != nil {
			d.rec.PrevModel, d.rec.PrevVersion, d.rec.PrevDigest = prev.GetName(), prev.GetVersion(), prev.GetBundleSha256()
			key := prev.GetName() + "@" + prev.GetVersion()
			m, ok := prevModels[key]
			if !ok {
				m, err = e.o.Store.Model(ctx, prev.GetName(), prev.GetVersion())
				if err != nil {
					m = store.Model{Size: -1} // not in the registry: cannot be restored
				}
				prevModels[key] = m
			}
			d.rec.PrevSize = m.Size
			if m.Digest != "" {
				d.rec.PrevDigest = m.Digest
			}
		}
		r.desired = append(r.desired, store.SlotChange{DeviceID: d.rec.DeviceID, Slot: r.ro.Slot, Set: &store.DesiredSlot{
			Model: r.model.Name, Version: r.model.Version, Digest: r.model.Digest, Size: r.model.Size,
			RolloutID: r.ro.ID, Health: health,
		}})
		r.setStep(d, StepNotified, now)
		d.rec.Detail = ""
	}
	return nil
}

// health is the policy sent with wave i's desired states.
func (r *run) health(i int) *store.HealthPolicy {
	soak := r.soak(i)
	h := r.spec.Strategy.Health
	// Always sent: without it the agent watches for its default minute,
	// and a soak of 0 would wait for that. 0 means "unset" on the wire,
	// so no soak is a watch of 1 ms.
	p := &store.HealthPolicy{WatchMS: uint32(max(1, min(soak.Milliseconds(), 1<<32-1)))}
	if h != nil {
		p.MaxErrorRate = h.MaxErrorRate
		p.MaxLatencyP99MS = uint32(min(h.MaxLatencyP99.D().Milliseconds(), 1<<32-1))
		p.MinInferences = uint32(h.MinInferences)
	}
	p.Shadow = r.shadowPolicy(i)
	return p
}

// fail stops the rollout after a failure: rollback or stop, as the
// specification says.
func (e *Engine) fail(ctx context.Context, r *run, now time.Time, reason string) {
	if r.ro.Wave < len(r.waves) {
		if w := r.waves[r.ro.Wave]; !w.state.done() {
			r.setWave(w, WaveFailed, now)
		}
	}
	e.log.Warn("rollout failed", "rollout", r.ro.ID, "reason", reason)
	if r.spec.Strategy.OnFailure == OnFailureStop {
		e.stopWaves(r, now)
		r.setPhase(PhaseAborted, now, reason)
		return
	}
	e.rollback(ctx, r, now, reason)
}

func (e *Engine) stopWaves(r *run, now time.Time) {
	for _, w := range r.waves {
		if !w.state.done() {
			r.setWave(w, WaveStopped, now)
		}
	}
}

// rollback issues the previous version to every device the rollout
// touched.
func (e *Engine) rollback(ctx context.Context, r *run, now time.Time, reason string) {
	e.stopWaves(r, now)
	if !r.setPhase(PhaseRollingBack, now, reason) {
		return
	}
	for _, d := range r.devs {
		if !d.step.touched() || d.step == StepRollingBack {
			continue
		}
		if !r.setStep(d, StepRollingBack, now) {
			continue
		}
		switch {
		case d.rec.PrevModel == "":
			// Nothing ran there before: the slot goes.
			r.desired = append(r.desired, store.SlotChange{DeviceID: d.rec.DeviceID, Slot: r.ro.Slot})
			d.rec.Detail = "removing the slot: nothing ran there before"
		case d.rec.PrevSize < 0:
			d.rec.Detail = fmt.Sprintf("cannot restore %s: that version is not stored on the controller; push it and roll back again", prevName(d))
		default:
			r.desired = append(r.desired, store.SlotChange{DeviceID: d.rec.DeviceID, Slot: r.ro.Slot, Set: &store.DesiredSlot{
				Model: d.rec.PrevModel, Version: d.rec.PrevVersion, Digest: d.rec.PrevDigest, Size: d.rec.PrevSize,
				RolloutID: r.ro.ID, Rollback: true,
			}})
			d.rec.Detail = "restoring " + prevName(d)
		}
		// It counts as rolled back once it reports the generation that
		// restores it (the commit assigns it), not before.
	}
}

// succeed finishes the rollout and hands the version to late joiners:
// devices that match the selector now but were not planned.
func (e *Engine) succeed(ctx context.Context, r *run, now time.Time) {
	if !r.setPhase(PhaseSucceeded, now, "") {
		return
	}
	briefs, err := e.o.Store.DeviceBriefs(ctx, r.ro.Slot, nil)
	if err != nil {
		e.log.Error("find late joiners", "rollout", r.ro.ID, "err", err)
		return
	}
	late := len(r.waves)
	order := len(r.devs)
	added := 0
	for _, b := range briefs {
		if r.byID[b.ID] != nil || !r.sel.Matches(b.Labels) || (b.Desired != nil && b.Desired.Digest == r.model.Digest) {
			continue
		}
		if other := e.claimedBy(b.ID, r.ro.Slot, r); other != nil {
			continue
		}
		d := &dev{rec: store.RolloutDevice{RolloutID: r.ro.ID, DeviceID: b.ID, Wave: late, Order: order, Step: StepPending.String()}}
		order++
		r.add(d)
		e.trackDevice(r, d)
		r.markDev(d)
		added++
	}
	if added > 0 {
		r.note(now, "%d late joiners get %s@%s", added, r.ro.Model, r.ro.Version)
		if err := e.notify(ctx, r, late, now); err != nil {
			e.log.Error("notify late joiners", "rollout", r.ro.ID, "err", err)
		}
	}
}

// claimedBy returns the other rollout in progress that manages slot on
// device id, if any.
func (e *Engine) claimedBy(id, slot string, except *run) *run {
	for _, o := range e.byDevice[id] {
		if o != except && o.ro.Slot == slot && !o.phase().Terminal() {
			return o
		}
	}
	return nil
}
