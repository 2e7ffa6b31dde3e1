package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Rollout is one staged rollout as stored. The rollout package gives the
// text fields (Phase, the waves' State, the devices' Step) their meaning;
// the store only keeps them.
type Rollout struct {
	ID string
	// Spec is the rollout's specification, JSON, as accepted.
	Spec    []byte
	Slot    string
	Model   string
	Version string
	Phase   string
	// Wave is the index of the wave in progress (or next to start).
	Wave   int
	Reason string
	// Targets is how many devices the plan holds.
	Targets int
	// Open is set while the controller still tracks the rollout's devices.
	Open bool
	// Revision goes up by one with every commit; CommitRollout refuses a
	// commit whose revision does not follow the stored one.
	Revision   uint64
	CreatedAt  time.Time
	UpdatedAt  time.Time
	FinishedAt time.Time
}

// RolloutWave is one wave of a rollout.
type RolloutWave struct {
	RolloutID string
	Index     int
	// SpecIndex is the wave of the specification this one carries out.
	SpecIndex int
	// Size is how many devices the wave holds.
	Size     int
	State    string
	Approved bool
	// Override is set when an operator resumed the wave past gates that
	// could not decide.
	Override   bool
	StartedAt  time.Time
	FinishedAt time.Time
	// Verdicts is the JSON of the gates' last verdicts.
	Verdicts []byte
	// DecidedAfter is how long the controller took, once the wave's last
	// device was done, to store and publish what came next (the next
	// wave's start, or the rollout's end); negative until measured. Only
	// SetWaveDecision writes it.
	DecidedAfter time.Duration
}

// RolloutDevice is one device's step in a rollout.
type RolloutDevice struct {
	RolloutID string
	DeviceID  string
	Wave      int
	// Order is the device's place in the plan.
	Order   int
	Stratum string
	Step    string
	// StepAt is when the device entered its step.
	StepAt      time.Time
	Deadline    time.Time
	ActivatedAt time.Time
	// Generation is the desired-state generation the rollout last issued
	// to the device.
	Generation uint64
	// Prev is what the device ran in the slot before the rollout touched
	// it: the version a rollback restores. An empty Model means nothing.
	PrevModel, PrevVersion, PrevDigest string
	PrevSize                           int64
	// Failure, when set, says why the device counts against the failure
	// budget.
	Failure string
	// Detail is the latest thing the device reported about its step.
	Detail string
}

// RolloutCommit is everything one decision of the rollout engine changes,
// written in one transaction: the rollout, the waves and device steps that
// changed, the desired states it issues, and lines for its history.
type RolloutCommit struct {
	Rollout Rollout
	// Create inserts the rollout; the error wraps ErrConflict if its id
	// is taken.
	Create  bool
	Waves   []RolloutWave
	Devices []RolloutDevice
	Desired []SlotChange
	History []string
}

// CommitRollout writes c in one transaction and returns the desired
// states it issued (build makes their documents, as for Assign), for the
// caller to publish once they are committed. The rollout's revision must
// be the stored one plus one (or 1 for Create); otherwise nothing is
// written and the error wraps ErrConflict.
func (s *Store) CommitRollout(ctx context.Context, c RolloutCommit, build BuildFunc) ([]Desired, error) {
	var out []Desired
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r := c.Rollout
		now := ms(r.UpdatedAt)
		if c.Create {
			_, err := tx.ExecContext(ctx, `
				INSERT INTO rollouts (id, spec, slot, model, version, phase, wave, reason, targets, open, revision, created_ms, updated_ms, finished_ms)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
				r.ID, string(r.Spec), r.Slot, r.Model, r.Version, r.Phase, r.Wave, r.Reason, r.Targets, r.Open, int64(r.Revision),
				ms(r.CreatedAt), now, ms(r.FinishedAt))
			if err != nil {
				if strings.Contains(err.Error(), "UNIQUE constraint failed") {
					return fmt.Errorf("rollout %q already exists: %w", r.ID, ErrConflict)
				}
				return fmt.Errorf("rollout %q: %w", r.ID, err)
			}
		} else {
			res, err := tx.ExecContext(ctx, `
				UPDATE rollouts SET phase = ?, wave = ?, reason = ?, targets = ?, open = ?, revision = ?, updated_ms = ?, finished_ms = ?
				WHERE id = ? AND revision = ?`,
				r.Phase, r.Wave, r.Reason, r.Targets, r.Open, int64(r.Revision), now, ms(r.FinishedAt), r.ID, int64(r.Revision)-1)
			if err != nil {
				return fmt.Errorf("rollout %q: %w", r.ID, err)
			}
			if n, err := res.RowsAffected(); err != nil || n != 1 {
				return fmt.Errorf("rollout %q: stored revision is not %d (another writer?): %w", r.ID, r.Revision-1, ErrConflict)
			}
		}
		if len(c.Waves) > 0 {
			stmt, err := tx.PrepareContext(ctx, `
				INSERT INTO rollout_waves (rollout_id, idx, spec_idx, size, state, approved, override, started_ms, finished_ms, verdicts)
				VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
				ON CONFLICT (rollout_id, idx) DO UPDATE SET spec_idx = excluded.spec_idx, size = excluded.size, state = excluded.state,
					approved = excluded.approved, override = excluded.override, started_ms = excluded.started_ms,
					finished_ms = excluded.finished_ms, verdicts = excluded.verdicts`)
			if err != nil {
				return err
			}
			defer stmt.Close()
			for _, w := range c.Waves {
				if _, err := stmt.ExecContext(ctx, r.ID, w.Index, w.SpecIndex, w.Size, w.State, w.Approved, w.Override,
					ms(w.StartedAt), ms(w.FinishedAt), string(w.Verdicts)); err != nil {
					return fmt.Errorf("rollout %q wave %d: %w", r.ID, w.Index, err)
				}
			}
		}
		for _, h := range c.History {
			if _, err := tx.ExecContext(ctx, `INSERT INTO rollout_history (rollout_id, at_ms, message) VALUES (?, ?, ?)`, r.ID, now, h); err != nil {
				return fmt.Errorf("rollout %q history: %w", r.ID, err)
			}
		}
		var err error
		out, err = issueDesired(ctx, tx, c.Desired, r.UpdatedAt, build)
		if err != nil {
			return err
		}
		// Each step records the generation just issued to its device, so a
		// refusal of that generation is recognised.
		issued := make(map[string]uint64, len(out))
		for _, d := range out {
			issued[d.DeviceID] = d.Generation
		}
		rows := make([][]any, 0, len(c.Devices))
		for _, d := range c.Devices {
			gen := d.Generation
			if g, ok := issued[d.DeviceID]; ok {
				gen = g
			}
			rows = append(rows, []any{r.ID, d.DeviceID, d.Wave, d.Order, d.Stratum, d.Step, ms(d.StepAt), ms(d.Deadline),
				ms(d.ActivatedAt), int64(gen), d.PrevModel, d.PrevVersion, d.PrevDigest, d.PrevSize, d.Failure, d.Detail})
		}
		b := newBulk(tx, `INSERT INTO rollout_devices (rollout_id, device_id, wave, ord, stratum, step, step_ms, deadline_ms, activated_ms,
				generation, prev_model, prev_version, prev_digest, prev_size, failure, detail) VALUES`, 16,
			`ON CONFLICT (rollout_id, device_id) DO UPDATE SET wave = excluded.wave, ord = excluded.ord,
				stratum = excluded.stratum, step = excluded.step, step_ms = excluded.step_ms,
				deadline_ms = excluded.deadline_ms, activated_ms = excluded.activated_ms,
				generation = excluded.generation, prev_model = excluded.prev_model,
				prev_version = excluded.prev_version, prev_digest = excluded.prev_digest,
				prev_size = excluded.prev_size, failure = excluded.failure, detail = excluded.detail`)
		defer b.close()
		if err := b.exec(ctx, rows); err != nil {
			return fmt.Errorf("rollout %q devices: %w", r.ID, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

const rolloutColumns = `id, spec, slot, model, version, phase, wave, reason, targets, open, revision, created_ms, updated_ms, finished_ms`

func scanRollout(row interface{ Scan(...any) error }) (Rollout, error) {
	var r Rollout
	var spec string
	var rev, created, updated, finished int64
	if err := row.Scan(&r.ID, &spec, &r.Slot, &r.Model, &r.Version, &r.Phase, &r.Wave, &r.Reason, &r.Targets, &r.Open,
		&rev, &created, &updated, &finished); err != nil {
		return Rollout{}, err
	}
	r.Spec = []byte(spec)
	r.Revision = uint64(rev)
	r.CreatedAt, r.UpdatedAt, r.FinishedAt = fromMS(created), fromMS(updated), fromMS(finished)
	return r, nil
}

// Rollout returns one rollout; the error wraps ErrNotFound if unknown.
func (s *Store) Rollout(ctx context.Context, id string) (Rollout, error) {
	return getRollout(ctx, s.db, id)
}

func getRollout(ctx context.Context, q queryer, id string) (Rollout, error) {
	r, err := scanRollout(q.QueryRowContext(ctx, `SELECT `+rolloutColumns+` FROM rollouts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Rollout{}, fmt.Errorf("rollout %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Rollout{}, fmt.Errorf("rollout %q: %w", id, err)
	}
	return r, nil
}

// Rollouts returns every rollout, newest first; with openOnly, only those
// the controller still tracks.
func (s *Store) Rollouts(ctx context.Context, openOnly bool) ([]Rollout, error) {
	q := `SELECT ` + rolloutColumns + ` FROM rollouts`
	if openOnly {
		q += ` WHERE open = 1`
	}
	rows, err := s.db.QueryContext(ctx, q+` ORDER BY created_ms DESC, id DESC`)
	if err != nil {
		return nil, fmt.Errorf("list rollouts: %w", err)
	}
	defer rows.Close()
	var out []Rollout
	for rows.Next() {
		r, err := scanRollout(rows)
		if err != nil {
			return nil, fmt.Errorf("list rollouts: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// SetWaveDecision records how long the decision that ended wave idx of
// rollout id took (RolloutWave.DecidedAfter). It is a measurement of a
// decision already committed, so it goes in on its own, outside
// CommitRollout's revision check.
func (s *Store) SetWaveDecision(ctx context.Context, id string, idx int, after time.Duration) error {
	res, err := s.db.ExecContext(ctx, `UPDATE rollout_waves SET decided_after_us = ? WHERE rollout_id = ? AND idx = ?`,
		max(0, after.Microseconds()), id, idx)
	if err != nil {
		return fmt.Errorf("rollout %q wave %d decision: %w", id, idx, err)
	}
	if n, err := res.RowsAffected(); err == nil && n == 0 {
		return fmt.Errorf("rollout %q wave %d decision: %w", id, idx, ErrNotFound)
	}
	return nil
}

// RolloutWaves returns the waves of a rollout in order.
func (s *Store) RolloutWaves(ctx context.Context, id string) ([]RolloutWave, error) {
	return rolloutWaves(ctx, s.db, id)
}

func rolloutWaves(ctx context.Context, q queryerRows, id string) ([]RolloutWave, error) {
	rows, err := q.QueryContext(ctx, `
		SELECT idx, spec_idx, size, state, approved, override, started_ms, finished_ms, verdicts, decided_after_us
		FROM rollout_waves WHERE rollout_id = ? ORDER BY idx`, id)
	if err != nil {
		return nil, fmt.Errorf("rollout %q waves: %w", id, err)
	}
	defer rows.Close()
	var out []RolloutWave
	for rows.Next() {
		w := RolloutWave{RolloutID: id}
		var started, finished, decided int64
		var verdicts string
		if err := rows.Scan(&w.Index, &w.SpecIndex, &w.Size, &w.State, &w.Approved, &w.Override, &started, &finished, &verdicts, &decided); err != nil {
			return nil, fmt.Errorf("rollout %q waves: %w", id, err)
		}
		w.StartedAt, w.FinishedAt = fromMS(started), fromMS(finished)
		w.DecidedAfter = time.Duration(decided) * time.Microsecond
		w.Verdicts = []byte(verdicts)
		out = append(out, w)
	}
	return out, rows.Err()
}

// RolloutDevices returns the device steps of a rollout in plan order.
func (s *Store) RolloutDevices(ctx context.Context, id string) ([]RolloutDevice, error) {
	rows, err := s.db.QueryContext(ctx, `
		SELECT device_id, wave, ord, stratum, step, step_ms, deadline_ms, activated_ms, generation,
			prev_model, prev_version, prev_digest, prev_size, failure, detail
		FROM rollout_devices WHERE rollout_id = ? ORDER BY ord`, id)
	if err != nil {
		return nil, fmt.Errorf("rollout %q devices: %w", id, err)
	}
	defer rows.Close()
	var out []RolloutDevice
	for rows.Next() {
		d := RolloutDevice{RolloutID: id}
		var stepAt, deadline, activated, gen int64
		if err := rows.Scan(&d.DeviceID, &d.Wave, &d.Order, &d.Stratum, &d.Step, &stepAt, &deadline, &activated, &gen,
			&d.PrevModel, &d.PrevVersion, &d.PrevDigest, &d.PrevSize, &d.Failure, &d.Detail); err != nil {
			return nil, fmt.Errorf("rollout %q devices: %w", id, err)
		}
		d.StepAt, d.Deadline, d.ActivatedAt = fromMS(stepAt), fromMS(deadline), fromMS(activated)
		d.Generation = uint64(gen)
		out = append(out, d)
	}
	return out, rows.Err()
}

// StepCount is how many devices of one wave are at one step.
type StepCount struct {
	Wave int
	Step string
	// Failed counts those of them that count against the failure budget.
	Failed int
	N      int
}

// RolloutStepCounts counts a rollout's devices by wave and step.
func (s *Store) RolloutStepCounts(ctx context.Context, id string) ([]StepCount, error) {
	return rolloutStepCounts(ctx, s.db, id)
}

func rolloutStepCounts(ctx context.Context, q queryerRows, id string) ([]StepCount, error) {
	rows, err := q.QueryContext(ctx, `
		SELECT wave, step, SUM(failure != ''), COUNT(*) FROM rollout_devices WHERE rollout_id = ?
		GROUP BY wave, step ORDER BY wave, step`, id)
	if err != nil {
		return nil, fmt.Errorf("rollout %q step counts: %w", id, err)
	}
	defer rows.Close()
	var out []StepCount
	for rows.Next() {
		var c StepCount
		if err := rows.Scan(&c.Wave, &c.Step, &c.Failed, &c.N); err != nil {
			return nil, fmt.Errorf("rollout %q step counts: %w", id, err)
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// HistoryEntry is one line of a rollout's history.
type HistoryEntry struct {
	At      time.Time
	Message string
}

// RolloutHistory returns the newest limit lines of a rollout's history,
// oldest first.
func (s *Store) RolloutHistory(ctx context.Context, id string, limit int) ([]HistoryEntry, error) {
	return rolloutHistory(ctx, s.db, id, limit)
}

func rolloutHistory(ctx context.Context, q queryerRows, id string, limit int) ([]HistoryEntry, error) {
	rows, err := q.QueryContext(ctx, `
		SELECT at_ms, message FROM (
			SELECT id, at_ms, message FROM rollout_history WHERE rollout_id = ? ORDER BY id DESC LIMIT ?
		) ORDER BY id`, id, limit)
	if err != nil {
		return nil, fmt.Errorf("rollout %q history: %w", id, err)
	}
	defer rows.Close()
	var out []HistoryEntry
	for rows.Next() {
		var h HistoryEntry
		var at int64
		if err := rows.Scan(&at, &h.Message); err != nil {
			return nil, fmt.Errorf("rollout %q history: %w", id, err)
		}
		h.At = fromMS(at)
		out = append(out, h)
	}
	return out, rows.Err()
}

// DeviceBrief is what the rollout engine reads about a device: labels for
// the selector, presence, the reported state, and what the controller
// wants in one slot.
type DeviceBrief struct {
	ID     string
	Labels map[string]string
	Online bool
	// State is the serialized edgefleet.v1.ReportedState, nil if none.
	State              []byte
	ReportedGeneration uint64
	// Desired is the device's desired slot (the one asked for), nil if
	// none.
	Desired *DesiredSlot
}

// briefChunk bounds the ids bound into one query.
const briefChunk = 500

// DeviceBriefs returns the briefs of the devices in ids (every device when
// ids is nil), sorted by id, with the desired slot named slot. Unknown ids
// are left out.
func (s *Store) DeviceBriefs(ctx context.Context, slot string, ids []string) ([]DeviceBrief, error) {
	const q = `
		SELECT d.id, d.labels, d.online, d.reported, d.reported_generation,
			s.slot, s.model_name, s.model_version, s.digest, s.size, s.rollout_id, s.rollback, s.health
		FROM devices d LEFT JOIN desired_slots s ON s.device_id = d.id AND s.slot = ?`
	var out []DeviceBrief
	scan := func(rows *sql.Rows, err error) error {
		if err != nil {
			return fmt.Errorf("read devices: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var (
				b                      DeviceBrief
				labels                 string
				repGen                 int64
				sSlot, sModel, sVer    sql.NullString
				sDigest, sRollout, sHe sql.NullString
				sSize                  sql.NullInt64
				sRollback              sql.NullBool
			)
			if err := rows.Scan(&b.ID, &labels, &b.Online, &b.State, &repGen,
				&sSlot, &sModel, &sVer, &sDigest, &sSize, &sRollout, &sRollback, &sHe); err != nil {
				return fmt.Errorf("read devices: %w", err)
			}
			if err := json.Unmarshal([]byte(labels), &b.Labels); err != nil {
				return fmt.Errorf("device %s: stored labels: %w", b.ID, err)
			}
			b.Labels = nonNil(b.Labels)
			b.ReportedGeneration = uint64(repGen)
			if sSlot.Valid {
				b.Desired = &DesiredSlot{Slot: sSlot.String, Model: sModel.String, Version: sVer.String, Digest: sDigest.String,
					Size: sSize.Int64, RolloutID: sRollout.String, Rollback: sRollback.Bool}
				if sHe.String != "" {
					b.Desired.Health = new(HealthPolicy)
					if err := json.Unmarshal([]byte(sHe.String), b.Desired.Health); err != nil {
						return fmt.Errorf("device %s: stored health policy: %w", b.ID, err)
					}
				}
			}
			out = append(out, b)
		}
		return rows.Err()
	}
	if ids == nil {
		if err := scan(s.db.QueryContext(ctx, q+` ORDER BY d.id`, slot)); err != nil {
			return nil, err
		}
		return out, nil
	}
	for start := 0; start < len(ids); start += briefChunk {
		chunk := ids[start:min(start+briefChunk, len(ids))]
		args := make([]any, 0, len(chunk)+1)
		args = append(args, slot)
		for _, id := range chunk {
			args = append(args, id)
		}
		marks := strings.TrimSuffix(strings.Repeat("?,", len(chunk)), ",")
		if err := scan(s.db.QueryContext(ctx, q+` WHERE d.id IN (`+marks+`)`, args...)); err != nil {
			return nil, err
		}
	}
	slices.SortFunc(out, func(x, y DeviceBrief) int { return strings.Compare(x.ID, y.ID) })
	return out, nil
}

// StoredEvent is an event with its row id, which orders events as they
// were stored.
type StoredEvent struct {
	ID int64
	Event
}

// EventsAfter returns up to limit events stored after row id after, oldest
// first. With rolloutIDs, only events naming one of those rollouts.
func (s *Store) EventsAfter(ctx context.Context, after int64, rolloutIDs []string, limit int) ([]StoredEvent, error) {
	q := `SELECT id, device_id, kind, slot, model, version, generation, rollout_id, detail, at_ms FROM events WHERE id > ?`
	args := []any{after}
	if rolloutIDs != nil {
		if len(rolloutIDs) == 0 {
			return nil, nil
		}
		q += ` AND rollout_id IN (` + strings.TrimSuffix(strings.Repeat("?,", len(rolloutIDs)), ",") + `)`
		for _, id := range rolloutIDs {
			args = append(args, id)
		}
	}
	rows, err := s.db.QueryContext(ctx, q+` ORDER BY id LIMIT ?`, append(args, limit)...)
	if err != nil {
		return nil, fmt.Errorf("read events: %w", err)
	}
	defer rows.Close()
	var out []StoredEvent
	for rows.Next() {
		var e StoredEvent
		var gen, at int64
		if err := rows.Scan(&e.ID, &e.DeviceID, &e.Kind, &e.Slot, &e.Model, &e.Version, &gen, &e.RolloutID, &e.Detail, &at); err != nil {
			return nil, fmt.Errorf("read events: %w", err)
		}
		e.Generation, e.At = uint64(gen), fromMS(at)
		out = append(out, e)
	}
	return out, rows.Err()
}

// LastEventID returns the row id of the newest stored event, 0 if none.
func (s *Store) LastEventID(ctx context.Context) (int64, error) {
	var id int64
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(id), 0) FROM events`).Scan(&id)
	return id, err
}
