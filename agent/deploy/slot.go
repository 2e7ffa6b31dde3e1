package deploy

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// slot is what runs in one slot. A slot value is never changed once
// published in Manager.slots: transitions build a new one (mutate), so an
// inference that found its model under the read lock sees one consistent
// slot.
type slot struct {
	active  *loaded
	since   time.Time
	rollout string // of the assignment that activated active
	gen     uint64 // generation of that assignment
	// watch is set while active is under its health watch.
	watch *watch
	// unhealthy says why active failed its watch with nothing to go back to.
	unhealthy string

	// previous is the last version known good before active; prevLoaded
	// is it, loaded, while active is watched (instant rollback).
	previous    *Ref
	prevRollout string
	prevLoaded  *loaded

	// cand is a version in its shadow phase.
	cand *candidate
	// shadowDone holds the figures of the last shadow phase that ended
	// here (switched, refused or dropped), reported until another starts.
	shadowDone *ShadowStats
	// refused is the last version rolled back or refused here.
	refused *RefusedRecord

	pending *pb.ModelRef
	lastErr string
}

// healthy reports whether the active version has passed its watch.
func (s *slot) healthy() bool { return s.active != nil && s.watch == nil && s.unhealthy == "" }

// models lists the loaded models the slot holds.
func (s *slot) models() []*loaded {
	var out []*loaded
	for _, l := range []*loaded{s.active, s.prevLoaded} {
		if l != nil {
			out = append(out, l)
		}
	}
	if s.cand != nil {
		out = append(out, s.cand.l)
	}
	return out
}

func (s *slot) record(clean bool) *SlotRecord {
	rec := &SlotRecord{Previous: s.previous, PreviousRolloutID: s.prevRollout, RolloutID: s.rollout,
		Generation: s.gen, Unhealthy: s.unhealthy, Refused: s.refused}
	if s.active != nil {
		r := s.active.ref
		rec.Active, rec.SinceUnixMs = &r, s.since.UnixMilli()
		if s.watch != nil {
			rec.Watch = s.watch.record(clean)
		}
	}
	return rec
}

// loaded is a model in service. Inferences hold mu for reading, so
// closing (which takes it for writing) waits for the calls in flight.
type loaded struct {
	ref   Ref
	mu    sync.RWMutex
	model Model
}

func (l *loaded) close(ctx context.Context) {
	l.mu.Lock()
	m := l.model
	l.model = nil
	l.mu.Unlock()
	if m != nil {
		m.Close(ctx)
	}
}

// errStale: the slot changed since the transition was decided.
var errStale = errors.New("slot changed meanwhile")

// mutate applies f to a copy of slot name, records the result in
// state.json, then publishes it; the models the old slot held and the new
// one does not are closed once their calls in flight finish. f returning
// errStale leaves everything as it was. f runs with switchMu held.
func (m *Manager) mutate(ctx context.Context, name string, f func(s *slot) error) error {
	m.switchMu.Lock()
	m.mu.RLock()
	var ns slot
	old := m.slots[name]
	if old != nil {
		ns = *old
	}
	m.mu.RUnlock()
	if err := f(&ns); err != nil {
		m.switchMu.Unlock()
		return err
	}
	m.mu.RLock()
	st := m.stateLocked(name, ns.record(false))
	m.mu.RUnlock()
	if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
		m.switchMu.Unlock()
		for _, l := range ns.models() {
			if old == nil || !slices.Contains(old.models(), l) {
				l.close(context.WithoutCancel(ctx))
			}
		}
		return fmt.Errorf("cannot record the change of slot %s (%w); free disk space on the device", name, err)
	}
	m.mu.Lock()
	m.setSlotLocked(name, &ns)
	m.mu.Unlock()
	m.switchMu.Unlock()
	if old != nil {
		keep := ns.models()
		for _, l := range old.models() {
			if !slices.Contains(keep, l) {
				l.close(context.WithoutCancel(ctx))
			}
		}
	}
	m.o.Reporter.StateChanged()
	return nil
}

// setSlotLocked publishes s as slot name (nil removes it). Callers hold mu.
func (m *Manager) setSlotLocked(name string, s *slot) {
	_, had := m.slots[name]
	if s == nil {
		delete(m.slots, name)
	} else {
		m.slots[name] = s
	}
	if _, has := m.slots[name]; has != had {
		m.order = m.order[:0]
		for n := range m.slots {
			m.order = append(m.order, n)
		}
		slices.Sort(m.order)
	}
}

// stateLocked returns state.json's content for the slots as they are,
// with slot name's record replaced by rec (name "" replaces nothing; a
// nil rec removes the slot). Callers hold mu.
func (m *Manager) stateLocked(name string, rec *SlotRecord) *State {
	st := &State{Version: stateVersion, Slots: map[string]*SlotRecord{}, Loading: m.poisoned}
	for n, s := range m.slots {
		st.Slots[n] = s.record(false)
	}
	if name != "" {
		if rec == nil {
			delete(st.Slots, name)
		} else {
			st.Slots[name] = rec
		}
	}
	return st
}

// activate makes l the active model of slot name, as assignment a of
// generation gen asked (detail goes into the ACTIVATED event). The
// version it replaces becomes previous unless a better fallback exists,
// and stays loaded while l is watched; an assignment ordering a rollback
// installs a known version: no watch.
func (m *Manager) activate(ctx context.Context, name string, l *loaded, a *pb.SlotAssignment, gen uint64, detail string) error {
	now := m.o.Now()
	var w *watch
	if !a.GetRollback() {
		p := PolicyFrom(a.GetHealth(), m.o.Health)
		w = &watch{policy: p, started: now, deadline: now.Add(p.Watch)}
	}
	err := m.mutate(ctx, name, func(s *slot) error {
		// The version replaced becomes the one to roll back to if it is
		// known good, or if there is no better one: unproven is better
		// than nothing, proven bad is not.
		if old := s.active; old != nil && old != l && old.ref.Digest != l.ref.Digest && s.unhealthy == "" &&
			(s.healthy() || s.previous == nil || s.previous.Digest == l.ref.Digest) {
			r := old.ref
			s.previous, s.prevRollout, s.prevLoaded = &r, s.rollout, old
		}
		if s.prevLoaded == l {
			s.prevLoaded = nil
		}
		if s.previous != nil && s.previous.Digest == l.ref.Digest {
			s.previous, s.prevRollout, s.prevLoaded = nil, "", nil
		}
		if s.cand != nil {
			st := s.cand.stats()
			s.shadowDone = &st
		}
		s.cand = nil // an activation supersedes any shadow phase
		s.active, s.since, s.rollout, s.gen = l, now, a.GetRolloutId(), gen
		s.watch, s.unhealthy = w, ""
		if w == nil {
			s.prevLoaded = nil // its bundle stays on disk
		}
		s.pending, s.lastErr = nil, ""
		return nil
	})
	if err != nil {
		return err
	}
	if w == nil && detail == "" {
		detail = "rollback ordered by the controller: a known version, not watched"
	}
	m.log.Info("model activated", "slot", name, "model", l.ref.Name, "version", l.ref.Version, "generation", gen,
		"rollout", a.GetRolloutId(), "watch", w != nil, "detail", detail)
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_ACTIVATED, Slot: name, Model: l.ref.proto(), Generation: gen,
		RolloutId: a.GetRolloutId(), Detail: detail, AtUnixMs: m.o.Now().UnixMilli()})
	m.pokeHealth()
	return nil
}

// startShadow puts l beside slot name's active version as its shadow
// candidate.
func (m *Manager) startShadow(ctx context.Context, name string, l *loaded, a *pb.SlotAssignment, gen uint64, p ShadowPolicy) error {
	c := &candidate{l: l, assign: a, gen: gen, policy: p, since: m.o.Now()}
	var active Ref
	err := m.mutate(ctx, name, func(s *slot) error {
		if s.active == nil {
			return errStale
		}
		c.active = s.active.ref
		active = c.active
		s.cand = c
		s.pending = a.GetModel()
		return nil
	})
	if errors.Is(err, errStale) {
		// The slot emptied meanwhile: nothing to shadow, switch.
		return m.activate(ctx, name, l, a, gen, "")
	}
	if err != nil {
		return err
	}
	m.shadowStarted(ctx, name, a, gen, &active, p)
	m.pokeHealth()
	return nil
}

// promote switches shadow candidate c of slot name in, as assignment a
// of generation gen asks (the candidate's own, or a later one that
// assigns it without a shadow phase).
func (m *Manager) promote(ctx context.Context, name string, c *candidate, a *pb.SlotAssignment, gen uint64, why string) error {
	if m.candidateOf(name) != c {
		return nil
	}
	return m.activate(ctx, name, c.l, a, gen, why)
}

// dropStaleCandidates ends the shadow phase of candidates the desired
// state no longer assigns.
func (m *Manager) dropStaleCandidates(ctx context.Context, ds *pb.DesiredState) {
	want := map[string]string{}
	for _, a := range ds.GetSlots() {
		want[a.GetSlot()] = a.GetModel().GetBundleSha256()
	}
	m.mu.RLock()
	var stale []string
	for name, s := range m.slots {
		if s.cand != nil && want[name] != s.cand.l.ref.Digest {
			stale = append(stale, name)
		}
	}
	m.mu.RUnlock()
	for _, name := range stale {
		err := m.mutate(ctx, name, func(s *slot) error {
			if s.cand == nil || want[name] == s.cand.l.ref.Digest {
				return errStale
			}
			m.log.Info("shadow candidate dropped: no longer desired", "slot", name, "version", s.cand.l.ref.Version)
			st := s.cand.stats()
			s.cand, s.pending, s.shadowDone = nil, nil, &st
			return nil
		})
		if err != nil && !errors.Is(err, errStale) {
			m.noteError(err.Error())
		}
	}
}

// remove stops slot name's models: the desired state no longer lists it.
func (m *Manager) remove(ctx context.Context, name string) error {
	m.switchMu.Lock()
	m.mu.RLock()
	st := m.stateLocked(name, nil)
	m.mu.RUnlock()
	if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
		m.switchMu.Unlock()
		return fmt.Errorf("cannot record the removal of slot %s (%w); free disk space on the device", name, err)
	}
	m.mu.Lock()
	s := m.slots[name]
	m.setSlotLocked(name, nil)
	m.mu.Unlock()
	m.switchMu.Unlock()
	if s != nil {
		for _, l := range s.models() {
			l.close(context.WithoutCancel(ctx))
		}
	}
	delete(m.failures, name)
	m.log.Info("slot removed: the desired state no longer lists it", "slot", name)
	m.o.Reporter.StateChanged()
	return nil
}

// setPending sets what slot name converges to and its last error. It does
// not touch state.json (neither is persisted).
func (m *Manager) setPending(name string, ref *pb.ModelRef, lastErr string) {
	m.switchMu.Lock()
	m.mu.Lock()
	var ns slot
	if s := m.slots[name]; s != nil {
		ns = *s
	}
	ns.pending, ns.lastErr = ref, lastErr
	if ref != nil && ns.cand == nil {
		// A new convergence begins: the last shadow phase's figures are
		// of another attempt, and must not pass for this one's.
		ns.shadowDone = nil
	}
	m.setSlotLocked(name, &ns)
	m.mu.Unlock()
	m.switchMu.Unlock()
	m.o.Reporter.StateChanged()
}

func (m *Manager) activeRef(name string) *Ref {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if s := m.slots[name]; s != nil && s.active != nil {
		r := s.active.ref
		return &r
	}
	return nil
}

// loadedIn returns the previous model of slot name if it is loaded and
// has digest.
func (m *Manager) loadedIn(name, digest string) *loaded {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if s := m.slots[name]; s != nil && s.prevLoaded != nil && s.prevLoaded.ref.Digest == digest {
		return s.prevLoaded
	}
	return nil
}

func (m *Manager) candidateOf(name string) *candidate {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if s := m.slots[name]; s != nil {
		return s.cand
	}
	return nil
}

// refusedFor reports whether slot name gave up on digest in generation gen.
func (m *Manager) refusedFor(name, digest string, gen uint64) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s := m.slots[name]
	// Refused under the orders of generation gen, or under a renewal of
	// them (OrdersGeneration): refusals never predate their order.
	return s != nil && s.refused != nil && s.refused.Digest == digest && s.refused.Generation >= gen
}

// lookupLocked finds the slot serving name: the first slot (by name)
// whose active model is called name, else the slot called name. Callers
// hold mu.
func (m *Manager) lookupLocked(name string) (string, *slot) {
	for _, n := range m.order {
		if s := m.slots[n]; s.active != nil && s.active.ref.Name == name {
			return n, s
		}
	}
	if s := m.slots[name]; s != nil && s.active != nil {
		return name, s
	}
	return "", nil
}

// Acquire returns the active model serving name (a model name, or else a
// slot name) and a release func the caller must call when its inference
// is done. The model is not closed before release is called. Calls made
// through Acquire are not seen by the health watch nor shadowed: use
// Infer.
func (m *Manager) Acquire(name string) (Model, func(), bool) {
	m.mu.RLock()
	_, s := m.lookupLocked(name)
	if s == nil {
		m.mu.RUnlock()
		return nil, nil, false
	}
	l := s.active
	l.mu.RLock()
	m.mu.RUnlock()
	if l.model == nil {
		l.mu.RUnlock()
		return nil, nil, false
	}
	return l.model, l.mu.RUnlock, true
}

// Infer runs in on the active model serving name (a model name, or else a
// slot name); a non-empty version must be the active one's. It is what
// the local endpoint and in-process callers (the fleet simulator) use:
// the outputs always come from the one version Result names, even when a
// switch happens during the call. The call counts for the version's
// health watch, and a shadow candidate gets a copy of it.
func (m *Manager) Infer(ctx context.Context, name, version string, in []tensor.Tensor) (Result, error) {
	m.mu.RLock()
	sname, s := m.lookupLocked(name)
	if s == nil {
		m.mu.RUnlock()
		return Result{}, fmt.Errorf("%w: %q", ErrNoModel, name)
	}
	l, w, c := s.active, s.watch, s.cand
	// Taken under mu: a switch publishes the new slot before it closes
	// the old model, so l is not closing yet.
	l.mu.RLock()
	m.mu.RUnlock()
	model := l.model
	if model == nil {
		l.mu.RUnlock()
		return Result{}, fmt.Errorf("%w: %q", ErrNoModel, name)
	}
	res := Result{Slot: sname, Model: l.ref.Name, Version: l.ref.Version}
	if version != "" && version != res.Version {
		l.mu.RUnlock()
		return res, fmt.Errorf("%w: %q version %s (version %s is)", ErrNoModel, name, version, res.Version)
	}
	start := time.Now()
	out, err := model.Infer(ctx, in)
	res.Latency = time.Since(start)
	l.mu.RUnlock()
	res.Outputs = out
	if w != nil && w.observe(res.Latency, err) {
		m.pokeHealth()
	}
	if c != nil && err == nil {
		m.offerShadow(c, l.ref, in, out, res.Latency)
	}
	return res, err
}

// offerShadow copies a live call to candidate c, unless its queue is full.
func (m *Manager) offerShadow(c *candidate, active Ref, in, out []tensor.Tensor, took time.Duration) {
	c.mu.Lock()
	c.offered++
	c.active = active
	full := len(m.shadowQ) >= cap(m.shadowQ)
	if full {
		c.skipped++
	}
	c.mu.Unlock()
	if full {
		return
	}
	// Copies: the caller owns its tensors once Infer returns.
	j := shadowJob{c: c, in: cloneTensors(in), out: cloneTensors(out), activeLat: took}
	select {
	case m.shadowQ <- j:
	default:
		c.mu.Lock()
		c.skipped++
		c.mu.Unlock()
	}
}

// Manifest returns the manifest of the active model serving name.
func (m *Manager) Manifest(name string) (*bundle.Manifest, bool) {
	model, release, ok := m.Acquire(name)
	if !ok {
		return nil, false
	}
	defer release()
	return model.Manifest(), true
}

// Ready reports whether at least one model is active.
func (m *Manager) Ready() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, s := range m.slots {
		if s.active != nil {
			return true
		}
	}
	return false
}

// Slots returns the reported state of every slot, ordered by name.
func (m *Manager) Slots() []*pb.SlotState {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*pb.SlotState, 0, len(m.slots))
	for _, name := range m.order {
		s := m.slots[name]
		ss := &pb.SlotState{Slot: name, LastError: s.lastErr, Healthy: s.healthy()}
		if s.pending != nil {
			ss.Pending = proto.Clone(s.pending).(*pb.ModelRef)
		}
		if s.active != nil {
			ss.Active = s.active.ref.proto()
			ss.ActiveSinceUnixMs = s.since.UnixMilli()
			ss.RolloutId = s.rollout
		}
		if s.previous != nil {
			ss.Previous = s.previous.proto()
		}
		if s.cand != nil {
			ss.Shadow = s.cand.stats().proto()
		} else if s.shadowDone != nil {
			ss.Shadow = s.shadowDone.proto()
		}
		out = append(out, ss)
	}
	return out
}

// Shadows returns the figures of every shadow candidate, by slot.
func (m *Manager) Shadows() map[string]ShadowStats {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := map[string]ShadowStats{}
	for name, s := range m.slots {
		if s.cand != nil {
			out[name] = s.cand.stats()
		}
	}
	return out
}

// Watches returns the counts of every health watch in progress, by slot.
func (m *Manager) Watches() map[string]WatchCounts {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := map[string]WatchCounts{}
	for name, s := range m.slots {
		if s.watch != nil {
			out[name] = s.watch.snapshot()
		}
	}
	return out
}

func (r Ref) proto() *pb.ModelRef {
	return &pb.ModelRef{Name: r.Name, Version: r.Version, BundleSha256: r.Digest}
}

// Close records the health watches in progress as cleanly stopped, then
// closes every loaded model, waiting for calls in flight. Call it after
// Run has returned.
func (m *Manager) Close(ctx context.Context) {
	m.switchMu.Lock()
	m.mu.Lock()
	watching := false
	for _, s := range m.slots {
		watching = watching || s.watch != nil
	}
	if watching {
		st := &State{Version: stateVersion, Slots: map[string]*SlotRecord{}, Loading: m.poisoned}
		for n, s := range m.slots {
			st.Slots[n] = s.record(true)
		}
		if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
			m.log.Error("cannot record the health watches in progress", "err", err)
		}
	}
	var ls []*loaded
	for _, s := range m.slots {
		ls = append(ls, s.models()...)
	}
	m.mu.Unlock()
	m.switchMu.Unlock()
	for _, l := range ls {
		l.close(ctx)
	}
}
