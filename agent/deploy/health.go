package deploy

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// healthLoop decides health watches and shadow phases: when a call may
// have settled one (Infer pokes it), when a deadline passes, and it saves
// the counts of running watches every SaveInterval.
func (m *Manager) healthLoop(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	lastSave := m.o.Now()
	for {
		next := m.checkHealth(ctx)
		now := m.o.Now()
		if m.watching() {
			if now.Sub(lastSave) >= m.o.SaveInterval {
				m.saveWatches()
				lastSave = now
			}
			next = earliest(next, lastSave.Add(m.o.SaveInterval))
		}
		timer.Stop()
		if !next.IsZero() {
			timer.Reset(max(0, next.Sub(now)))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-m.healthWake:
		case <-timer.C:
		}
	}
}

func (m *Manager) watching() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, s := range m.slots {
		if s.watch != nil {
			return true
		}
	}
	return false
}

// saveWatches writes the counts of the watches in progress to state.json
// if they changed, so a crash loses at most SaveInterval of them.
func (m *Manager) saveWatches() {
	m.switchMu.Lock()
	defer m.switchMu.Unlock()
	m.mu.RLock()
	dirty := false
	for _, s := range m.slots {
		if w := s.watch; w != nil {
			w.mu.Lock()
			dirty = dirty || w.dirty
			w.mu.Unlock()
		}
	}
	var st *State
	if dirty {
		st = m.stateLocked("", nil)
	}
	m.mu.RUnlock()
	if st == nil {
		return
	}
	if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
		m.log.Warn("cannot save the health watch counts", "err", err)
	}
}

// checkHealth acts on every watch and shadow phase that is decided and
// returns when to look again (zero: no deadline pending).
func (m *Manager) checkHealth(ctx context.Context) time.Time {
	type item struct {
		name string
		w    *watch
		l    *loaded
		c    *candidate
	}
	var items []item
	m.mu.RLock()
	for _, name := range m.order {
		s := m.slots[name]
		if s.watch != nil || s.cand != nil {
			items = append(items, item{name, s.watch, s.active, s.cand})
		}
	}
	m.mu.RUnlock()
	var next time.Time
	now := m.o.Now()
	for _, it := range items {
		if ctx.Err() != nil {
			return time.Time{}
		}
		if w := it.w; w != nil {
			w.mu.Lock()
			over := !now.Before(w.deadline)
			v, why := w.policy.Judge(w.counts, over, w.extended)
			deadline := w.deadline
			if v == Extend {
				w.extended, w.deadline, w.dirty = true, now.Add(w.policy.Watch), true
				deadline = w.deadline
			}
			w.mu.Unlock()
			switch v {
			case Watching, Extend:
				if v == Extend {
					m.log.Info("health watch extended", "slot", it.name, "version", it.l.ref.Version, "why", why)
				}
				next = earliest(next, deadline)
			case Healthy:
				m.passWatch(ctx, it.name, w, it.l, why)
			case Breached:
				m.breach(ctx, it.name, w, it.l, why)
			}
		}
		if c := it.c; c != nil {
			decided, promote, why := c.judge(now)
			p, assign, gen := c.terms()
			switch {
			case !decided && !p.Hold:
				next = earliest(next, c.since.Add(p.MaxDuration))
			case decided && promote:
				if err := m.promote(ctx, it.name, c, assign, gen, "after the shadow phase: "+why); err != nil {
					m.noteError(err.Error())
					next = earliest(next, now.Add(m.o.RetryMin))
				}
			case decided:
				m.refuseCandidate(ctx, it.name, c, why)
			}
		}
	}
	return next
}

// passWatch ends w: the version is healthy; the previous one is unloaded
// (its bundle stays on disk, and its machine code in the compilation
// cache, so a later rollback is a fast load).
func (m *Manager) passWatch(ctx context.Context, name string, w *watch, l *loaded, why string) {
	var rollout string
	var gen uint64
	err := m.mutate(ctx, name, func(s *slot) error {
		if s.watch != w {
			return errStale
		}
		s.watch, s.prevLoaded = nil, nil
		rollout, gen = s.rollout, s.gen
		return nil
	})
	if errors.Is(err, errStale) {
		return
	}
	if err != nil {
		m.noteError(err.Error())
		return
	}
	m.log.Info("model healthy", "slot", name, "version", l.ref.Version, "figures", why)
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_HEALTHY, Slot: name, Model: l.ref.proto(), Generation: gen,
		RolloutId: rollout, Detail: why, AtUnixMs: m.o.Now().UnixMilli()})
}

// breach handles a version that broke its bounds: back to the previous
// version at once (ROLLED_BACK), or, with none, keep serving it marked
// unhealthy (FAILED).
func (m *Manager) breach(ctx context.Context, name string, w *watch, bad *loaded, why string) {
	var rollout, restored string
	var gen uint64
	rolledBack := false
	err := m.mutate(ctx, name, func(s *slot) error {
		if s.watch != w || s.active != bad {
			return errStale
		}
		rollout, gen = s.rollout, s.gen
		s.watch = nil
		s.refused = &RefusedRecord{Ref: bad.ref, Generation: m.Generation(), Reason: why}
		prev := s.prevLoaded
		if prev == nil && s.previous != nil {
			// Not loaded (the agent restarted and could not load it then):
			// load it now, from the stored bundle.
			model, err := m.loadStored(ctx, *s.previous)
			if err != nil {
				m.log.Error("cannot load the previous version to roll back to", "slot", name, "version", s.previous.Version, "err", err)
			} else {
				prev = &loaded{ref: *s.previous, model: model}
			}
		}
		if prev == nil {
			s.unhealthy = why
			s.lastErr = fmt.Sprintf("%s %s broke its health bounds: %s; no previous version to go back to, so it keeps serving", bad.ref.Name, bad.ref.Version, why)
			return nil
		}
		rolledBack, restored = true, prev.ref.Version
		s.active, s.since, s.rollout = prev, m.o.Now(), s.prevRollout
		s.previous, s.prevRollout, s.prevLoaded = nil, "", nil
		s.unhealthy = ""
		s.pending = nil
		s.lastErr = fmt.Sprintf("rolled back %s %s to %s: %s", bad.ref.Name, bad.ref.Version, restored, why)
		return nil
	})
	if errors.Is(err, errStale) {
		return
	}
	if err != nil {
		m.noteError(err.Error())
		return
	}
	if !rolledBack {
		m.log.Error("new version broke its health bounds; nothing to roll back to", "slot", name, "version", bad.ref.Version, "figures", why)
		m.noteError(fmt.Sprintf("slot %s: %s %s: %s", name, bad.ref.Name, bad.ref.Version, why))
		m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Slot: name, Model: bad.ref.proto(), Generation: gen,
			RolloutId: rollout, Detail: "health watch: " + why + "; no previous version to roll back to, so it keeps serving",
			AtUnixMs: m.o.Now().UnixMilli()})
		return
	}
	detail := fmt.Sprintf("%s; rolled back to %s", why, restored)
	m.log.Warn("new version broke its health bounds; rolled back", "slot", name, "version", bad.ref.Version, "restored", restored, "figures", why)
	m.noteError(fmt.Sprintf("slot %s: rolled back %s %s: %s", name, bad.ref.Name, bad.ref.Version, why))
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_ROLLED_BACK, Slot: name, Model: bad.ref.proto(), Generation: gen,
		RolloutId: rollout, Detail: detail, AtUnixMs: m.o.Now().UnixMilli()})
}

// refuseCandidate ends a shadow phase whose answers disagree too much.
func (m *Manager) refuseCandidate(ctx context.Context, name string, c *candidate, why string) {
	_, assign, gen := c.terms()
	err := m.mutate(ctx, name, func(s *slot) error {
		if s.cand != c {
			return errStale
		}
		st := c.stats()
		s.cand, s.pending, s.shadowDone = nil, nil, &st
		s.refused = &RefusedRecord{Ref: c.l.ref, Generation: gen, Reason: "shadow phase: " + why}
		s.lastErr = fmt.Sprintf("refused %s %s after its shadow phase: %s", c.l.ref.Name, c.l.ref.Version, why)
		return nil
	})
	if errors.Is(err, errStale) {
		return
	}
	if err != nil {
		m.noteError(err.Error())
		return
	}
	m.log.Warn("shadow candidate refused", "slot", name, "version", c.l.ref.Version, "figures", why)
	m.noteError(fmt.Sprintf("slot %s: refused %s %s after its shadow phase: %s", name, c.l.ref.Name, c.l.ref.Version, why))
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Slot: name, Model: c.l.ref.proto(), Generation: gen,
		RolloutId: assign.GetRolloutId(), Detail: "shadow phase: " + why, AtUnixMs: m.o.Now().UnixMilli()})
}

// shadowLoop answers the live calls copied to shadow candidates, one at
// a time: a candidate must not take the device's cores from the active
// version.
func (m *Manager) shadowLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case j := <-m.shadowQ:
			j.run(ctx)
			j.c.mu.Lock()
			due := !j.c.policy.Hold && j.c.compared == uint64(j.c.policy.MinInferences)
			report := shadowReportDue(j.c.compared, j.c.policy.MinInferences)
			j.c.mu.Unlock()
			if due {
				m.pokeHealth()
			}
			if report {
				// The figures are in the reported state (SlotState.shadow):
				// a held wave's gate waits for them.
				m.o.Reporter.StateChanged()
			}
		}
	}
}
