package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/edgefleet/edgefleet/agent/fetch"
	"github.com/edgefleet/edgefleet/agent/internal/durable"
)

// File names under the data directory.
const (
	// DesiredFile holds the last accepted SignedDesiredState, as received.
	DesiredFile = "desired.pb"
	// GenerationFile holds the last accepted generation, in decimal. It is
	// written before desired.pb, so a lost or unreadable desired.pb never
	// lowers the generation a replayed desired state must beat.
	GenerationFile = "generation"
	// StateFile holds what runs in each slot (the agent's own record).
	StateFile = "state.json"
	// BundlesDir holds <digest>.bundle and <digest>.part files.
	BundlesDir = "bundles"
)

// maxStateFile caps state.json; it holds a few lines per slot.
const maxStateFile = 1 << 20

// stateVersion is the layout of state.json this code writes and reads.
// A file may come from a newer agent (after a self-update is undone, the
// previous agent reads what the new one wrote): fields a reader does not
// know are ignored, and a layout is refused only when its "compat" (the
// oldest layout that can use it; the layout itself when absent) is above
// stateVersion. A change that older agents cannot safely ignore raises
// stateCompat.
const stateVersion = 1

// stateCompat is the oldest layout that can use a file this code writes.
const stateCompat = 1

// Ref names one stored bundle: the model in it and its digest.
type Ref struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Digest  string `json:"digest"`
}

// SlotRecord is what state.json records for one slot.
type SlotRecord struct {
	Active *Ref `json:"active,omitempty"`
	// SinceUnixMs is when Active became active.
	SinceUnixMs int64 `json:"since_unix_ms,omitempty"`
	// Previous is the last version known good before Active; its bundle
	// is kept for a rollback.
	Previous *Ref `json:"previous,omitempty"`
	// RolloutID and Generation are those of the assignment that
	// activated Active (PreviousRolloutID: Previous's).
	RolloutID         string `json:"rollout_id,omitempty"`
	PreviousRolloutID string `json:"previous_rollout_id,omitempty"`
	Generation        uint64 `json:"generation,omitempty"`
	// Watch is set while Active is under its post-activation health watch.
	Watch *WatchRecord `json:"watch,omitempty"`
	// Unhealthy is why Active failed its watch with no previous version to
	// go back to, so it still serves; empty when it is fine. (Absent in
	// files of agents before the health watch: their versions are good.)
	Unhealthy string `json:"unhealthy,omitempty"`
	// Refused is the last version rolled back or refused in this slot: it
	// is not activated again for the same desired generation.
	Refused *RefusedRecord `json:"refused,omitempty"`
}

// WatchRecord is a health watch in progress.
type WatchRecord struct {
	Policy         PolicyRecord `json:"policy"`
	StartedUnixMs  int64        `json:"started_unix_ms"`
	DeadlineUnixMs int64        `json:"deadline_unix_ms"`
	Extended       bool         `json:"extended,omitempty"`
	// Restarts counts the agent's starts during the watch that did not
	// follow a clean stop: a version that kills the agent is rolled back.
	Restarts int `json:"restarts,omitempty"`
	// Clean is set by a clean stop.
	Clean  bool        `json:"clean,omitempty"`
	Counts WatchCounts `json:"counts"`
}

// PolicyRecord is a HealthPolicy in state.json.
type PolicyRecord struct {
	WatchMs         int64   `json:"watch_ms"`
	MaxErrorRate    float64 `json:"max_error_rate"`
	MaxLatencyP99Ms int64   `json:"max_latency_p99_ms,omitempty"`
	MinInferences   uint32  `json:"min_inferences"`
}

// RefusedRecord names a version the slot gave up on, and why.
type RefusedRecord struct {
	Ref
	Generation uint64 `json:"generation"`
	Reason     string `json:"reason"`
}

// LoadingRecord is written before a new bundle is loaded and removed once
// the load ended, either way. Finding it at start means the agent died
// while loading (a crash in the runtime, an out-of-memory kill, a power
// cut): after maxLoadAttempts such deaths the bundle is not tried again,
// so a poisonous bundle cannot put the device in a crash loop.
type LoadingRecord struct {
	Slot     string `json:"slot"`
	Digest   string `json:"digest"`
	Attempts int    `json:"attempts"`
}

// State is the content of state.json.
type State struct {
	Version int `json:"version"`
	// Compat is the oldest layout that can use this file (see stateVersion).
	Compat  int                    `json:"compat,omitempty"`
	Slots   map[string]*SlotRecord `json:"slots"`
	Loading *LoadingRecord         `json:"loading,omitempty"`
}

// ParseState decodes state.json, refusing layouts it cannot use and
// anything that could not have been written by the agent; fields it does
// not know (a newer agent's) are ignored.
func ParseState(data []byte) (*State, error) {
	if len(data) > maxStateFile {
		return nil, fmt.Errorf("%d bytes, over the %d byte cap", len(data), maxStateFile)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	st := &State{}
	if err := dec.Decode(st); err != nil {
		return nil, err
	}
	compat := st.Compat
	if compat == 0 {
		compat = st.Version
	}
	if st.Version < 1 || compat > stateVersion {
		return nil, fmt.Errorf("layout version %d (usable from layout %d); this agent reads up to %d: run a newer agent", st.Version, compat, stateVersion)
	}
	st.Version, st.Compat = stateVersion, stateCompat
	for slot, r := range st.Slots {
		if r == nil || !slotRE.MatchString(slot) {
			return nil, fmt.Errorf("slot %q is malformed", slot)
		}
		refs := []*Ref{r.Active, r.Previous}
		if r.Refused != nil {
			refs = append(refs, &r.Refused.Ref)
		}
		for _, ref := range refs {
			if ref != nil && !fetch.ValidDigest(ref.Digest) {
				return nil, fmt.Errorf("slot %q: digest %q is malformed", slot, ref.Digest)
			}
		}
		if w := r.Watch; w != nil {
			p := w.Policy
			if r.Active == nil || p.WatchMs <= 0 || p.MaxLatencyP99Ms < 0 || !(p.MaxErrorRate >= 0 && p.MaxErrorRate <= 1) ||
				w.Restarts < 0 || len(w.Counts.Latency) > latencyBuckets || w.Counts.Errors > w.Counts.Inferences {
				return nil, fmt.Errorf("slot %q: watch record is malformed", slot)
			}
		}
	}
	if l := st.Loading; l != nil && (!slotRE.MatchString(l.Slot) || !fetch.ValidDigest(l.Digest) || l.Attempts < 0) {
		return nil, fmt.Errorf("loading record %+v is malformed", *l)
	}
	if st.Slots == nil {
		st.Slots = map[string]*SlotRecord{}
	}
	return st, nil
}

func readState(path string) (*State, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return &State{Version: stateVersion, Slots: map[string]*SlotRecord{}}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxStateFile+1))
	if err != nil {
		return nil, err
	}
	st, err := ParseState(data)
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w; move it aside to start with no models", path, err)
	}
	return st, nil
}

func writeState(path string, st *State) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return durable.WriteFile(path, append(data, '\n'))
}
