package rollout

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
)

// Status is a rollout as operators see it, read from the store (so it is
// what was committed, never a decision in progress).
type Status struct {
	ID       string
	Spec     Spec
	Model    string
	Version  string
	Slot     string
	Phase    Phase
	Reason   string
	Revision uint64
	// Wave is the index of the wave in progress or next to start; equal to
	// len(Waves) once every wave is done.
	Wave          int
	Targets       int
	Failures      int
	FailureBudget int
	// Steps counts the planned devices by step.
	Steps map[Step]int
	Waves []WaveStatus
	// Late counts the late joiners by step.
	Late       map[Step]int
	CreatedAt  time.Time
	UpdatedAt  time.Time
	FinishedAt time.Time
	History    []store.HistoryEntry
}

// WaveStatus is one wave as operators see it.
type WaveStatus struct {
	Index      int
	Size       int
	State      WaveState
	Approval   bool
	Approved   bool
	Override   bool
	Soak       time.Duration
	StartedAt  time.Time
	FinishedAt time.Time
	// DecidedAfter is store.RolloutWave.DecidedAfter: negative until the
	// wave's decision is made and measured.
	DecidedAfter time.Duration
	Steps        map[Step]int
	Failed       int
	Verdicts     []Verdict
}

// HistoryLimit is how many history lines Status returns.
const HistoryLimit = 50

// Status reads rollout id; the error wraps ErrNotFound if it is unknown.
// What it returns was read from one snapshot of the store
// (store.RolloutView): a wave that ended and the next one, started in the
// same commit, are never seen one without the other.
func (e *Engine) Status(ctx context.Context, id string) (Status, error) {
	return e.status(ctx, id, HistoryLimit)
}

// List reads every rollout, newest first.
func (e *Engine) List(ctx context.Context) ([]Status, error) {
	ros, err := e.o.Store.Rollouts(ctx, false)
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(ros))
	for _, ro := range ros {
		s, err := e.status(ctx, ro.ID, 0)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func (e *Engine) status(ctx context.Context, id string, historyLimit int) (Status, error) {
	v, err := e.o.Store.RolloutView(ctx, id, historyLimit)
	if errors.Is(err, store.ErrNotFound) {
		return Status{}, fmt.Errorf("rollout %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Status{}, err
	}
	ro := v.Rollout
	var spec Spec
	if err := json.Unmarshal(ro.Spec, &spec); err != nil {
		return Status{}, fmt.Errorf("rollout %s: stored specification: %w", ro.ID, err)
	}
	s := Status{
		ID: ro.ID, Spec: spec, Model: ro.Model, Version: ro.Version, Slot: ro.Slot, Phase: Phase(ro.Phase),
		Reason: ro.Reason, Revision: ro.Revision, Wave: ro.Wave, Targets: ro.Targets,
		FailureBudget: spec.Budget(ro.Targets), Steps: map[Step]int{}, Late: map[Step]int{},
		CreatedAt: ro.CreatedAt, UpdatedAt: ro.UpdatedAt, FinishedAt: ro.FinishedAt,
	}
	for _, w := range v.Waves {
		ws := WaveStatus{
			Index: w.Index, Size: w.Size, State: WaveState(w.State), Approved: w.Approved, Override: w.Override,
			StartedAt: w.StartedAt, FinishedAt: w.FinishedAt, DecidedAfter: w.DecidedAfter, Steps: map[Step]int{},
		}
		if w.SpecIndex < len(spec.Strategy.Waves) {
			sw := spec.Strategy.Waves[w.SpecIndex]
			ws.Approval = sw.Approval
			if sw.Soak != nil {
				ws.Soak = sw.Soak.D()
			}
		}
		if len(w.Verdicts) > 0 {
			if err := json.Unmarshal(w.Verdicts, &ws.Verdicts); err != nil {
				return Status{}, fmt.Errorf("rollout %s wave %d: stored verdicts: %w", ro.ID, w.Index, err)
			}
		}
		s.Waves = append(s.Waves, ws)
	}
	for _, c := range v.Counts {
		st, err := ParseStep(c.Step)
		if err != nil {
			return Status{}, fmt.Errorf("rollout %s: %w", ro.ID, err)
		}
		if c.Wave >= len(s.Waves) {
			s.Late[st] += c.N
			continue
		}
		s.Steps[st] += c.N
		s.Failures += c.Failed
		s.Waves[c.Wave].Steps[st] += c.N
		s.Waves[c.Wave].Failed += c.Failed
	}
	s.History = v.History
	return s, nil
}

// DeviceStatus is one device's step in a rollout.
type DeviceStatus struct {
	Device string
	// Wave is the device's wave; len(waves) for a late joiner.
	Wave     int
	Step     Step
	StepAt   time.Time
	Deadline time.Time
	// Previous is what a rollback restores, "" for nothing.
	Previous   string
	Generation uint64
	Failure    string
	Detail     string
}

// Devices reads the device steps of rollout id, in plan order.
func (e *Engine) Devices(ctx context.Context, id string) ([]DeviceStatus, error) {
	if _, err := e.o.Store.Rollout(ctx, id); errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("rollout %q: %w", id, ErrNotFound)
	} else if err != nil {
		return nil, err
	}
	recs, err := e.o.Store.RolloutDevices(ctx, id)
	if err != nil {
		return nil, err
	}
	out := make([]DeviceStatus, 0, len(recs))
	for _, r := range recs {
		st, err := ParseStep(r.Step)
		if err != nil {
			return nil, fmt.Errorf("rollout %s device %s: %w", id, r.DeviceID, err)
		}
		ds := DeviceStatus{Device: r.DeviceID, Wave: r.Wave, Step: st, StepAt: r.StepAt, Deadline: r.Deadline,
			Generation: r.Generation, Failure: r.Failure, Detail: r.Detail}
		if r.PrevModel != "" {
			ds.Previous = r.PrevModel + "@" + r.PrevVersion
		}
		out = append(out, ds)
	}
	return out, nil
}
