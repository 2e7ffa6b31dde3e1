// Package update is the agent's self-update: it installs the agent
// release the desired state names (download, verify, swap the binary,
// restart) and, in supervisor mode, is the watchdog that puts the previous
// binary back when a new one does not prove itself.
//
// # The record
//
// Agent and supervisor share one small file, DATA/agent-update.json
// (Record), written atomically (temporary file, fsync, rename, fsync of
// the directory). Whoever writes it: the agent while it runs, the
// supervisor only while the agent is not running, so the two never race.
// Its states and every transition (anything not listed does not happen):
//
//	(none)   -> trial     agent: the release is verified, the new binary staged as .NAME.new
//	                      and the running one hard-linked to NAME.old; the record is written,
//	                      then NAME is replaced by the new binary (one rename) and the agent
//	                      re-executes itself
//	trial    -> healthy   agent (new version): connected and reported its state; the version
//	                      floor rises to it; a probation of one more deadline starts
//	trial    -> restored  supervisor: the agent exited, or the deadline passed without the
//	                      healthy marker, or it was started MaxStarts times in the trial
//	trial    -> (none)    agent or supervisor: NAME is still the old binary (the agent died
//	                      before the rename): nothing was replaced, the update is retried
//	healthy  -> (none)    agent: the probation passed
//	healthy  -> restored  supervisor: the new version exited MaxExits times in its probation
//	restored -> failed    agent (old version again): reported ROLLED_BACK with the reason
//	failed   -> (none)    agent: a newer desired generation (which may order the release again)
//
// "restored" is written before the files are put back and the supervisor
// re-does the restore whenever it finds the record "restored" while NAME
// is not the old binary, so a kill between the two steps is harmless.
//
// # Files of the binary
//
// NAME (the agent's executable) is never missing: the previous binary is
// kept as a hard link NAME.old made before the swap, and NAME is replaced
// only by rename(2) of a complete, fsynced file, both ways. So at every
// instant NAME is a complete binary, either the old or the new one, which
// is what makes SIGKILL of agent or supervisor at any moment safe.
package update

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/durable"
)

// RecordFile is the record's file name in the data directory.
const RecordFile = "agent-update.json"

// FloorFile holds the agent's version floor: the highest version that ran
// healthy on this device.
const FloorFile = "agent-floor"

// recordLayout is the layout of the record this code writes. Readers
// ignore fields they do not know (a newer agent may add some, and after a
// rollback an older one reads its file), and refuse only a layout whose
// Compat says they cannot use it.
const recordLayout = 1

// maxRecord caps the record file.
const maxRecord = 16 << 10

// State is where an update stands (see the package comment).
type State string

// The states.
const (
	StateTrial    State = "trial"
	StateHealthy  State = "healthy"
	StateRestored State = "restored"
	StateFailed   State = "failed"
)

func (s State) valid() bool {
	switch s {
	case StateTrial, StateHealthy, StateRestored, StateFailed:
		return true
	}
	return false
}

// Record is the content of DATA/agent-update.json.
type Record struct {
	// Layout is the layout this file was written with; Compat the oldest
	// layout a reader must know to use it.
	Layout int   `json:"layout"`
	Compat int   `json:"compat"`
	State  State `json:"state"`
	// From and To are the versions the update goes between.
	From string `json:"from"`
	To   string `json:"to"`
	// Exe is the path of the agent's executable.
	Exe        string `json:"exe"`
	RolloutID  string `json:"rollout_id,omitempty"`
	Generation uint64 `json:"generation,omitempty"`
	// SwappedUnixMs is when the new binary was put in place.
	SwappedUnixMs int64 `json:"swapped_unix_ms"`
	// DeadlineUnixMs ends the trial: the new version must be healthy by then.
	DeadlineUnixMs int64 `json:"deadline_unix_ms"`
	// ProbationUnixMs ends the probation after the healthy marker.
	ProbationUnixMs int64 `json:"probation_unix_ms,omitempty"`
	// Starts counts the supervisor's starts of the new binary in its trial;
	// Exits its exits during the probation.
	Starts int `json:"starts,omitempty"`
	Exits  int `json:"exits,omitempty"`
	// Reason says why the update was undone or failed.
	Reason string `json:"reason,omitempty"`
}

// Deadline is the end of the trial.
func (r *Record) Deadline() time.Time { return time.UnixMilli(r.DeadlineUnixMs) }

// ParseRecord decodes the record. Unknown fields are ignored; a record
// that needs a newer reader (Compat above recordLayout) is refused.
func ParseRecord(b []byte) (*Record, error) {
	if len(b) > maxRecord {
		return nil, fmt.Errorf("%d bytes, over the %d byte cap", len(b), maxRecord)
	}
	r := &Record{}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(r); err != nil {
		return nil, err
	}
	if r.Compat > recordLayout {
		return nil, fmt.Errorf("layout %d needs a reader of layout %d; this agent reads %d", r.Layout, r.Compat, recordLayout)
	}
	if !r.State.valid() || r.To == "" || r.Exe == "" || r.Starts < 0 || r.Exits < 0 {
		return nil, fmt.Errorf("record %+v is malformed", *r)
	}
	return r, nil
}

// ReadRecord reads DATA/agent-update.json; nil, nil when there is none.
func ReadRecord(dataDir string) (*Record, error) {
	path := filepath.Join(dataDir, RecordFile)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxRecord+1))
	if err != nil {
		return nil, err
	}
	r, err := ParseRecord(b)
	if err != nil {
		return nil, fmt.Errorf("update record %s: %w; move it aside if the agent binary is fine", path, err)
	}
	return r, nil
}

// WriteRecord replaces DATA/agent-update.json with r (nil deletes it),
// durably.
func WriteRecord(dataDir string, r *Record) error {
	path := filepath.Join(dataDir, RecordFile)
	if r == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		durable.SyncDir(dataDir)
		return nil
	}
	r.Layout, r.Compat = recordLayout, 1
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return durable.WriteFile(path, append(b, '\n'))
}

// ReadFloor returns the agent's version floor ("" when none is stored).
func ReadFloor(dataDir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, FloorFile))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if len(b) > 64 {
		return "", fmt.Errorf("version floor %s is %d bytes; a version is a few", FloorFile, len(b))
	}
	return string(bytes.TrimSpace(b)), nil
}

func writeFloor(dataDir, v string) error {
	return durable.WriteFile(filepath.Join(dataDir, FloorFile), []byte(v+"\n"))
}
