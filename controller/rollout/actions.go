package rollout

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/edgefleet/edgefleet/controller/selector"
	"github.com/edgefleet/edgefleet/controller/store"
)

// Action is an operator's control of a rollout.
type Action string

// The actions.
const (
	// ActionPause stops starting waves and notifying devices; steps in
	// progress go on, and failures still stop the rollout.
	ActionPause Action = "pause"
	// ActionResume undoes a pause, and goes past gates that could not
	// decide if that was why it paused.
	ActionResume Action = "resume"
	// ActionApprove lets the wave waiting for approval start.
	ActionApprove Action = "approve"
	// ActionAbort stops the rollout and leaves every device on the
	// version it has.
	ActionAbort Action = "abort"
	// ActionRollback restores the previous version on every device the
	// rollout touched.
	ActionRollback Action = "rollback"
)

// Actions lists the actions.
func Actions() []Action {
	return []Action{ActionPause, ActionResume, ActionApprove, ActionAbort, ActionRollback}
}

// PlannedRollout is what Plan answers: the waves a rollout would have.
type PlannedRollout struct {
	ID            string
	Spec          Spec
	Targets       int
	FailureBudget int
	Waves         []PlannedWave
}

// prepared is a specification checked against the inventory.
type prepared struct {
	id      string
	spec    Spec
	model   store.Model
	targets []Target
	plan    Plan
}

func (e *Engine) prepare(ctx context.Context, spec Spec) (*prepared, error) {
	if err := spec.Normalize(e.KnownGate); err != nil {
		return nil, err
	}
	name, version := spec.ModelRef()
	m, err := e.o.Store.Model(ctx, name, version)
	if errors.Is(err, store.ErrNotFound) && spec.Agent != "" {
		return nil, fmt.Errorf("agent release %s is not stored; push it first (fleet agent release push): %w", version, ErrNotFound)
	}
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("model %s@%s is not stored; push its bundle first (fleet model push): %w", name, version, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	sel, err := selector.Parse(spec.Selector)
	if err != nil {
		return nil, fmt.Errorf("%w: selector: %v", ErrInvalid, err)
	}
	briefs, err := e.o.Store.DeviceBriefs(ctx, spec.Slot, nil)
	if err != nil {
		return nil, err
	}
	p := &prepared{spec: spec, model: m, id: spec.Name}
	for _, b := range briefs {
		if !sel.Matches(b.Labels) {
			continue
		}
		t := Target{ID: b.ID}
		if k := spec.Strategy.StratifyBy; k != "" {
			t.Stratum = b.Labels[k]
		}
		p.targets = append(p.targets, t)
	}
	if len(p.targets) == 0 {
		return nil, fmt.Errorf("%w: no device matches selector %q; check the labels with fleet devices", ErrInvalid, sel.String())
	}
	if p.id == "" {
		p.id = generatedName(name, version)
	}
	sizes := make([]Size, len(spec.Strategy.Waves))
	for i, w := range spec.Strategy.Waves {
		sizes[i] = w.Size
	}
	p.plan = MakePlan(p.id, p.targets, sizes)
	return p, nil
}

// generatedName names a rollout whose specification has no name.
func generatedName(model, version string) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	base := strings.Map(func(c rune) rune {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '.', c == '_':
			return c
		case c >= 'A' && c <= 'Z':
			return c + 'a' - 'A'
		}
		return '-'
	}, model+"-"+version)
	base = strings.TrimLeft(base, "-._")
	if len(base) > 50 {
		base = base[:50]
	}
	if base == "" {
		base = "rollout"
	}
	return base + "-" + hex.EncodeToString(b[:])
}

// conflicts returns the error naming the rollout in progress that already
// manages the slot on some of the targets, or nil.
func (e *Engine) conflicts(p *prepared) error {
	type hit struct {
		r   *run
		ids []string
	}
	var hits []hit
	seen := map[*run]int{}
	for _, t := range p.targets {
		for _, r := range e.byDevice[t.ID] {
			if r.ro.Slot != p.spec.Slot || r.phase().Terminal() {
				continue
			}
			i, ok := seen[r]
			if !ok {
				i = len(hits)
				seen[r] = i
				hits = append(hits, hit{r: r})
			}
			hits[i].ids = append(hits[i].ids, t.ID)
		}
	}
	if len(hits) == 0 {
		return nil
	}
	h := hits[0]
	slices.Sort(h.ids)
	ex := h.ids[:min(3, len(h.ids))]
	return fmt.Errorf("%w: rollout %s (%s@%s into slot %s, %s) already manages slot %s on %d of the %d target devices (%s); wait for it to finish, abort it, or narrow the selector",
		ErrConflict, h.r.ro.ID, h.r.ro.Model, h.r.ro.Version, h.r.ro.Slot, h.r.ro.Phase, p.spec.Slot, len(h.ids), len(p.targets), strings.Join(ex, ", "))
}

// CheckUnclaimed returns an error wrapping ErrConflict, naming the rollout
// and devices, when a rollout in progress manages slot on any of the
// devices in ids: what it sends them must not be changed underneath it.
func (e *Engine) CheckUnclaimed(ctx context.Context, ids []string, slot string) error {
	var cerr error
	err := e.do(ctx, func(context.Context) {
		targets := make([]Target, len(ids))
		for i, id := range ids {
			targets[i] = Target{ID: id}
		}
		if err := e.conflicts(&prepared{spec: Spec{Slot: slot}, targets: targets}); err != nil {
			cerr = fmt.Errorf("%w; an assignment would change what it sends them", err)
		}
	})
	if err != nil {
		return err
	}
	return cerr
}

// Plan answers what Create would plan for spec, without creating it.
func (e *Engine) Plan(ctx context.Context, spec Spec) (PlannedRollout, error) {
	var out PlannedRollout
	var perr error
	err := e.do(ctx, func(ctx context.Context) {
		p, err := e.prepare(ctx, spec)
		if err != nil {
			perr = err
			return
		}
		if err := e.conflicts(p); err != nil {
			perr = err
			return
		}
		out = PlannedRollout{ID: p.id, Spec: p.spec, Targets: len(p.targets), FailureBudget: p.spec.Budget(len(p.targets)), Waves: p.plan.Waves}
	})
	if err != nil {
		return PlannedRollout{}, err
	}
	return out, perr
}

// Create plans a rollout, commits it and starts its first wave (or waits
// for its approval). It returns the rollout's id.
func (e *Engine) Create(ctx context.Context, spec Spec) (string, error) {
	var id string
	var cerr error
	err := e.do(ctx, func(ctx context.Context) {
		id, cerr = e.create(ctx, spec)
	})
	if err != nil {
		return "", err
	}
	return id, cerr
}

func (e *Engine) create(ctx context.Context, spec Spec) (string, error) {
	p, err := e.prepare(ctx, spec)
	if err != nil {
		return "", err
	}
	if e.runs[p.id] != nil {
		return "", fmt.Errorf("%w: a rollout named %q exists; pick another name", ErrConflict, p.id)
	}
	if _, err := e.o.Store.Rollout(ctx, p.id); err == nil {
		return "", fmt.Errorf("%w: a rollout named %q exists; pick another name", ErrConflict, p.id)
	} else if !errors.Is(err, store.ErrNotFound) {
		return "", err
	}
	if err := e.conflicts(p); err != nil {
		return "", err
	}
	specJSON, err := json.Marshal(p.spec)
	if err != nil {
		return "", err
	}
	now := e.o.Now()
	name, version := p.spec.ModelRef()
	ro := store.Rollout{
		ID: p.id, Spec: specJSON, Slot: p.spec.Slot, Model: name, Version: version,
		Phase: string(PhaseRunning), Targets: len(p.targets), Open: true, CreatedAt: now, UpdatedAt: now,
	}
	r := newRun(ro, p.spec, p.model)
	order := 0
	for i, pw := range p.plan.Waves {
		w := &wave{rec: store.RolloutWave{RolloutID: p.id, Index: i, SpecIndex: pw.Spec, Size: len(pw.Devices)}, state: WavePending}
		r.waves = append(r.waves, w)
		r.markWave(w)
		for _, t := range pw.Devices {
			d := &dev{rec: store.RolloutDevice{RolloutID: p.id, DeviceID: t.ID, Wave: i, Order: order, Stratum: t.Stratum, Step: StepPending.String()}}
			order++
			r.add(d)
			r.markDev(d)
		}
	}
	r.note(now, "created: %s@%s into slot %s on %d devices matching %q, %d waves", name, version, p.spec.Slot, len(p.targets), p.spec.Selector, len(r.waves))
	e.track(r)
	if err := e.refreshObs(ctx, r.ids()); err != nil {
		e.untrack(r)
		return "", err
	}
	e.advance(ctx, r, now)
	more := r.more
	if err := e.commit(ctx, r, now, true); err != nil {
		e.untrack(r)
		return "", err
	}
	r.wakeAt = e.wakeAfter(r, now, more)
	e.log.Info("rollout created", "rollout", r.ro.ID, "model", name, "version", version, "slot", p.spec.Slot, "devices", len(p.targets), "waves", len(r.waves))
	return r.ro.ID, nil
}

// Act applies an operator's action to rollout id.
func (e *Engine) Act(ctx context.Context, id string, a Action) error {
	var aerr error
	err := e.do(ctx, func(ctx context.Context) {
		aerr = e.act(ctx, id, a)
	})
	if err != nil {
		return err
	}
	return aerr
}

func (e *Engine) act(ctx context.Context, id string, a Action) error {
	r := e.runs[id]
	if r == nil {
		ro, err := e.o.Store.Rollout(ctx, id)
		if errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("rollout %q: %w", id, ErrNotFound)
		}
		if err != nil {
			return err
		}
		if a != ActionRollback || (Phase(ro.Phase) != PhaseAborted && Phase(ro.Phase) != PhaseSucceeded) {
			return fmt.Errorf("%w: rollout %s is %s; %s", ErrState, id, ro.Phase, hint(Phase(ro.Phase), a))
		}
		// A finished rollout is rolled back: track it again.
		if r, err = e.loadRun(ctx, ro); err != nil {
			return err
		}
		e.track(r)
		if err := e.refreshObs(ctx, r.ids()); err != nil {
			e.untrack(r)
			return err
		}
	}
	now := e.o.Now()
	cur := r.phase()
	var w *wave
	if r.ro.Wave < len(r.waves) {
		w = r.waves[r.ro.Wave]
	}
	switch a {
	case ActionPause:
		if cur != PhaseRunning && cur != PhaseWaitingApproval {
			return fmt.Errorf("%w: rollout %s is %s; %s", ErrState, id, cur, hint(cur, a))
		}
		r.setPhase(PhasePaused, now, "paused by an operator")
	case ActionResume:
		if cur != PhasePaused {
			return fmt.Errorf("%w: rollout %s is %s; %s", ErrState, id, cur, hint(cur, a))
		}
		if w != nil && w.state == WaveHeld {
			w.rec.Override = true
			r.setWave(w, WaveRunning, now)
			r.note(now, "wave %d resumed past inconclusive gates by an operator", r.ro.Wave+1)
		}
		r.setPhase(PhaseRunning, now, "")
	case ActionApprove:
		if w == nil || w.state != WaveWaitingApproval {
			return fmt.Errorf("%w: rollout %s is %s and no wave waits for approval; %s", ErrState, id, cur, hint(cur, a))
		}
		w.rec.Approved = true
		r.markWave(w)
		r.note(now, "wave %d approved by an operator", r.ro.Wave+1)
		if cur == PhaseWaitingApproval {
			r.setPhase(PhaseRunning, now, "")
		}
	case ActionAbort:
		if !cur.progressing() {
			return fmt.Errorf("%w: rollout %s is %s; %s", ErrState, id, cur, hint(cur, a))
		}
		e.stopWaves(r, now)
		r.setPhase(PhaseAborted, now, "aborted by an operator; devices keep the version they have")
	case ActionRollback:
		if !CanPhase(cur, PhaseRollingBack) {
			return fmt.Errorf("%w: rollout %s is %s; %s", ErrState, id, cur, hint(cur, a))
		}
		e.rollback(ctx, r, now, "rolled back by an operator")
	default:
		return fmt.Errorf("%w: unknown action %q; use pause, resume, approve, abort or rollback", ErrInvalid, a)
	}
	e.log.Info("rollout action", "rollout", id, "action", a, "phase", r.ro.Phase)
	r.more = false
	e.advance(ctx, r, now)
	decisions, more, issued := r.decisions, r.more, len(r.desired)
	if err := e.commit(ctx, r, now, false); err != nil {
		return err
	}
	e.reportDecisions(ctx, r, decisions, issued)
	r.wakeAt = e.wakeAfter(r, now, more)
	return nil
}

// hint says what can be done with a rollout in phase p instead of a.
func hint(p Phase, a Action) string {
	switch p {
	case PhaseSucceeded:
		return "it is finished; roll it back, or create a new rollout"
	case PhaseAborted:
		return "it was aborted; roll it back, or create a new rollout"
	case PhaseRollingBack, PhaseRolledBack:
		return "it is being or was rolled back; create a new rollout to try again"
	case PhasePaused:
		return "resume it first"
	case PhaseWaitingApproval:
		if a == ActionResume {
			return "it is not paused: it waits for approval (fleet rollout approve)"
		}
		return "approve it to go on"
	case PhaseRunning:
		if a == ActionResume {
			return "it is not paused"
		}
		return "nothing waits for approval now; approve when it waits before a wave"
	}
	return "see fleet rollout get"
}
