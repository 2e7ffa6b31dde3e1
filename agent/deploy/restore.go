package deploy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// Restore loads the last accepted desired state and the models state.json
// says were active, so the agent serves them before it has any network,
// and resumes the health watches that were running. Problems with one
// slot are logged and reported in its state; Restore fails only when the
// data directory itself is unusable.
//
// A watch resumes with its counts and its deadline (wall clock: the time
// the agent was down counts, it is no reason to watch longer). A start
// that does not follow a clean stop counts against the watched version:
// after maxWatchRestarts of them it is presumed to kill the agent and is
// rolled back before it serves.
func (m *Manager) Restore(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Join(m.o.DataDir, BundlesDir), 0o755); err != nil {
		return fmt.Errorf("data directory %s: %w", m.o.DataDir, err)
	}
	m.restoreDesired()
	st, err := readState(filepath.Join(m.o.DataDir, StateFile))
	if err != nil {
		m.log.Error("cannot read the state file; starting with no models", "err", err)
		m.noteError(err.Error())
		st = &State{Version: stateVersion, Slots: map[string]*SlotRecord{}}
	}
	changed := false
	if l := st.Loading; l != nil {
		changed = true
		if l.Attempts >= maxLoadAttempts {
			why := fmt.Sprintf("the agent stopped %d times while loading bundle %s; it will not try it again: assign another bundle", l.Attempts, l.Digest)
			m.failures[l.Slot] = &failure{digest: l.Digest, attempts: l.Attempts, permanent: true}
			m.poisoned = l
			m.noteError(fmt.Sprintf("slot %s: %s", l.Slot, why))
			m.log.Error("refusing a bundle the agent died loading", "slot", l.Slot, "digest", l.Digest, "attempts", l.Attempts)
			defer func() { m.setPending(l.Slot, nil, why) }()
		} else {
			m.loadAttempts[l.Digest] = l.Attempts
			m.log.Warn("the agent stopped while loading a bundle; it will try again", "slot", l.Slot, "digest", l.Digest, "attempts", l.Attempts)
		}
	}
	names := make([]string, 0, len(st.Slots))
	for name := range st.Slots {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if m.restoreSlot(ctx, name, st.Slots[name]) {
			changed = true
		}
	}
	if changed {
		m.mu.RLock()
		st := m.stateLocked("", nil)
		m.mu.RUnlock()
		if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
			m.log.Error("cannot update the state file", "err", err)
		}
	}
	return nil
}

// restoreSlot brings one slot back from its record and reports whether
// state.json must be rewritten.
func (m *Manager) restoreSlot(ctx context.Context, name string, rec *SlotRecord) (changed bool) {
	log := m.log.With("slot", name)
	s := &slot{previous: rec.Previous, prevRollout: rec.PreviousRolloutID, rollout: rec.RolloutID, gen: rec.Generation,
		since: time.UnixMilli(rec.SinceUnixMs), unhealthy: rec.Unhealthy, refused: rec.Refused}
	defer func() {
		m.mu.Lock()
		m.setSlotLocked(name, s)
		m.mu.Unlock()
	}()
	if rec.Active == nil {
		return false
	}
	active := *rec.Active
	if wr := rec.Watch; wr != nil {
		changed = true
		w := watchFromRecord(wr)
		if !wr.Clean {
			w.restarts++
		}
		if w.restarts >= maxWatchRestarts && rec.Previous != nil {
			why := fmt.Sprintf("the agent restarted %d times without a clean stop while watching it", w.restarts)
			model, err := m.loadStored(ctx, *rec.Previous)
			if err == nil {
				log.Error("rolling back a version the agent keeps dying with", "version", active.Version, "restored", rec.Previous.Version, "restarts", w.restarts)
				s.active = &loaded{ref: *rec.Previous, model: model}
				s.since, s.rollout = m.o.Now(), rec.PreviousRolloutID
				s.previous, s.prevRollout = nil, ""
				s.refused = &RefusedRecord{Ref: active, Generation: m.Generation(), Reason: why}
				s.lastErr = fmt.Sprintf("rolled back %s %s to %s: %s", active.Name, active.Version, rec.Previous.Version, why)
				m.noteError(fmt.Sprintf("slot %s: %s", name, s.lastErr))
				m.deferred = append(m.deferred, &pb.Event{Kind: pb.EventKind_EVENT_KIND_ROLLED_BACK, Slot: name, Model: active.proto(),
					Generation: rec.Generation, RolloutId: rec.RolloutID, Detail: fmt.Sprintf("%s; rolled back to %s", why, rec.Previous.Version),
					AtUnixMs: m.o.Now().UnixMilli()})
				return true
			}
			log.Error("cannot load the previous version to roll back to; keeping the watched one", "version", rec.Previous.Version, "err", err)
		}
		s.watch = w
		log.Info("resuming the health watch", "version", active.Version, "deadline", w.deadline, "restarts", w.restarts,
			"inferences", w.counts.Inferences, "errors", w.counts.Errors)
	}
	model, err := m.loadStored(ctx, active)
	if err == nil {
		s.active = &loaded{ref: active, model: model}
		log.Info("restored model", "model", active.Name, "version", active.Version)
		if s.watch != nil && s.previous != nil {
			// Ready for an instant rollback, as before the restart.
			if pm, err := m.loadStored(ctx, *s.previous); err == nil {
				s.prevLoaded = &loaded{ref: *s.previous, model: pm}
			} else {
				log.Warn("cannot load the previous version for a rollback; a rollback will retry", "version", s.previous.Version, "err", err)
			}
		}
		return changed
	}
	s.watch = nil
	s.lastErr = fmt.Sprintf("active model %s %s does not load: %v", active.Name, active.Version, err)
	log.Error("cannot restore the active model", "model", active.Name, "version", active.Version, "err", err)
	if rec.Previous != nil {
		if model, perr := m.loadStored(ctx, *rec.Previous); perr == nil {
			s.active = &loaded{ref: *rec.Previous, model: model}
			s.previous, s.prevRollout, s.since = nil, "", m.o.Now()
			s.rollout, s.unhealthy = rec.PreviousRolloutID, ""
			s.lastErr += "; serving the previous model " + rec.Previous.Version
			log.Warn("serving the previous model instead", "model", rec.Previous.Name, "version", rec.Previous.Version)
		}
	}
	m.noteError(s.lastErr)
	return true
}

func (m *Manager) restoreDesired() {
	// The generation file first: it is what keeps a replay refused when
	// desired.pb is gone or unreadable.
	if g, err := readGeneration(filepath.Join(m.o.DataDir, GenerationFile)); err != nil {
		m.log.Error("cannot read the stored generation", "err", err)
		m.noteError(err.Error())
	} else {
		m.accepted.Store(g)
	}
	path := filepath.Join(m.o.DataDir, DesiredFile)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		m.log.Error("cannot read the stored desired state", "path", path, "err", err)
		return
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, MaxDesired+1024))
	sd := &pb.SignedDesiredState{}
	if err == nil {
		err = proto.Unmarshal(raw, sd)
	}
	var ds *pb.DesiredState
	if err == nil {
		ds, err = DecodeDesired(sd)
	}
	if err == nil && ds.GetDeviceId() != m.o.DeviceID {
		err = fmt.Errorf("it is for device %q, this agent is %q", ds.GetDeviceId(), m.o.DeviceID)
	}
	if err != nil {
		m.log.Error("ignoring the stored desired state", "path", path, "err", err)
		return
	}
	m.mu.Lock()
	m.desired, m.desiredRaw = ds, raw
	m.accepted.Store(max(m.accepted.Load(), ds.GetGeneration()))
	m.mu.Unlock()
	m.log.Info("restored desired state", "generation", ds.GetGeneration())
}

// loadStored loads a stored bundle, checking it again: the disk may have
// damaged it, and the trusted keys may have changed since it came.
func (m *Manager) loadStored(ctx context.Context, ref Ref) (Model, error) {
	b, err := m.readStored(ref.Digest)
	if err != nil {
		return nil, err
	}
	if err := m.o.Guard.CheckBundle(b); err != nil {
		return nil, permanentError{err}
	}
	return m.o.Loader.Load(ctx, b)
}

// readStored reads and decodes a stored bundle. A file whose digest no
// longer matches was damaged on disk: that error is transient (download
// it again). A file with the right digest that does not decode is a bad
// bundle: that error is permanent.
func (m *Manager) readStored(digest string) (*bundle.Bundle, error) {
	path := m.store.Path(digest)
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, bundle.MaxBundleSize+1))
	if err != nil {
		return nil, fmt.Errorf("read stored bundle %s: %w", path, err)
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != digest {
		return nil, fmt.Errorf("stored bundle %s was damaged on disk (sha256 now %s); it will be downloaded again", path, got)
	}
	b, err := bundle.Decode(data)
	if err != nil {
		return nil, permanentError{fmt.Errorf("bundle %s: %w", digest, err)}
	}
	return b, nil
}

// readGeneration reads the generation file; a missing file is generation 0.
func readGeneration(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("generation file %s: %w", path, err)
	}
	g, err := parseGeneration(b)
	if err != nil {
		return 0, fmt.Errorf("generation file %s: %w; restore or delete it", path, err)
	}
	return g, nil
}

// parseGeneration parses the generation file's content: one decimal
// number and optional surrounding white space.
func parseGeneration(b []byte) (uint64, error) {
	if len(b) > 32 {
		return 0, fmt.Errorf("%d bytes; it holds one number", len(b))
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}
