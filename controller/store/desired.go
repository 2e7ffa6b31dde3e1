package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
)

// Desired is the desired state issued to one device.
type Desired struct {
	DeviceID   string
	Generation uint64
	IssuedAt   time.Time
	// Slots are sorted by slot name.
	Slots []DesiredSlot
	// Doc is the document published for this generation (the serialized
	// edgefleet.v1.SignedDesiredState), kept so a re-publish sends exactly
	// the bytes that were signed.
	Doc []byte
	// Published is set once the broker acknowledged the publish of this
	// generation.
	Published bool
}

// DesiredSlot is what one slot of a device must run.
type DesiredSlot struct {
	Slot    string
	Model   string
	Version string
	Digest  string
	Size    int64
	// RolloutID names the rollout that put this version here; empty for a
	// plain assignment.
	RolloutID string
	// Rollback is set when the slot deliberately goes back to an older
	// version, which the agent otherwise refuses.
	Rollback bool
	// Health bounds the version on the device after it is activated; nil
	// leaves the agent's defaults.
	Health *HealthPolicy
}

// HealthPolicy is how an agent watches a newly activated version (the
// wire's edgefleet.v1.HealthPolicy, kept here in the store's own terms).
type HealthPolicy struct {
	WatchMS         uint32  `json:"watchMs"`
	MaxErrorRate    float64 `json:"maxErrorRate"`
	MaxLatencyP99MS uint32  `json:"maxLatencyP99Ms"`
	MinInferences   uint32  `json:"minInferences"`
	// Shadow, when set, asks for a shadow phase before the switch (the
	// wire's SlotAssignment.shadow). It is kept with the health policy,
	// in the same column: both say how the device vets a new version.
	Shadow *ShadowPolicy `json:"shadow,omitempty"`
}

// ShadowPolicy is the wire's edgefleet.v1.ShadowPolicy in the store's
// terms.
type ShadowPolicy struct {
	MinInferences uint32  `json:"minInferences,omitempty"`
	MaxMS         uint32  `json:"maxMs,omitempty"`
	MinAgreement  float64 `json:"minAgreement,omitempty"`
	Tolerance     float64 `json:"tolerance,omitempty"`
	Hold          bool    `json:"hold,omitempty"`
}

// SlotChange changes one slot of one device's desired state.
type SlotChange struct {
	DeviceID string
	Slot     string
	// Set is what the slot must run from now on; nil removes the slot
	// from the desired state (the agent then stops its model).
	Set *DesiredSlot
}

// BuildFunc fills in d.Doc for a desired state whose generation, issue time
// and slots the store has just chosen. It runs inside the transaction, so
// the document and the generation it names commit together, and it must be
// safe to call from several goroutines at once: the documents of a large
// commit are built (signed) on every core.
type BuildFunc func(d *Desired) error

// parallelBuild is the number of documents from which buildAll uses more
// than one goroutine.
const parallelBuild = 64

// buildAll runs build on every document, on all cores for many: signing
// each desired state is most of the work of notifying a large wave.
func buildAll(docs []Desired, build BuildFunc) error {
	workers := min(runtime.GOMAXPROCS(0), len(docs)/parallelBuild+1)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(docs); i += workers {
				if err := build(&docs[i]); err != nil {
					errs[w] = fmt.Errorf("device %q: build desired state: %w", docs[i].DeviceID, err)
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Assign puts slot into the desired state of each device in ids: per
// device, it takes the next generation (above both the last one issued and
// the one the device reports, so a controller restored from an old backup
// never issues a generation the agent would refuse as a replay), replaces
// that slot, lets build make the document, and stores it unpublished. All
// devices commit in one transaction, or none does. The error wraps
// ErrNotFound if a device or the slot's model is unknown.
func (s *Store) Assign(ctx context.Context, ids []string, slot DesiredSlot, issued time.Time, build BuildFunc) ([]Desired, error) {
	changes := make([]SlotChange, len(ids))
	for i, id := range ids {
		sl := slot
		changes[i] = SlotChange{DeviceID: id, Slot: slot.Slot, Set: &sl}
	}
	return s.IssueDesired(ctx, changes, issued, build)
}

// IssueDesired applies slot changes to desired states the way Assign does,
// one new generation per device however many of its slots change, in one
// transaction. Devices come out in the order they first appear in changes.
func (s *Store) IssueDesired(ctx context.Context, changes []SlotChange, issued time.Time, build BuildFunc) ([]Desired, error) {
	var out []Desired
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = issueDesired(ctx, tx, changes, issued, build)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func issueDesired(ctx context.Context, tx *sql.Tx, changes []SlotChange, issued time.Time, build BuildFunc) ([]Desired, error) {
	if len(changes) == 0 {
		return nil, nil
	}
	var order []string
	byDevice := map[string][]SlotChange{}
	models := map[[2]string]bool{}
	for _, c := range changes {
		if _, ok := byDevice[c.DeviceID]; !ok {
			order = append(order, c.DeviceID)
		}
		byDevice[c.DeviceID] = append(byDevice[c.DeviceID], c)
		if c.Set != nil {
			models[[2]string{c.Set.Model, c.Set.Version}] = true
		}
	}
	// Unknown models are named here; the foreign key would only say that
	// one of thousands of rows is wrong.
	for m := range models {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM models WHERE name = ? AND version = ?`, m[0], m[1]).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return nil, fmt.Errorf("model %s@%s: %w", m[0], m[1], ErrNotFound)
		}
		if err != nil {
			return nil, fmt.Errorf("model %s@%s: %w", m[0], m[1], err)
		}
	}

	// Read every device's generations and slots in a few queries.
	type gens struct{ gen, reported int64 }
	known := make(map[string]gens, len(order))
	err := queryIn(ctx, tx, `SELECT id, generation, reported_generation FROM devices WHERE id IN (`, nil, order, func(rows *sql.Rows) error {
		var id string
		var g gens
		if err := rows.Scan(&id, &g.gen, &g.reported); err != nil {
			return err
		}
		known[id] = g
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read devices: %w", err)
	}
	slotsOf := make(map[string][]DesiredSlot, len(order))
	memo := map[string]*HealthPolicy{}
	err = queryIn(ctx, tx, `SELECT device_id, `+desiredSlotColumns+` FROM desired_slots WHERE device_id IN (`, nil, order, func(rows *sql.Rows) error {
		var id string
		sl, err := scanDesiredSlotMemo(rows, memo, &id)
		if err != nil {
			return err
		}
		slotsOf[id] = append(slotsOf[id], sl)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read desired slots: %w", err)
	}

	out := make([]Desired, 0, len(order))
	var slotRows, genRows, docRows [][]any
	var removed [][2]string
	healthText := map[*HealthPolicy]string{}
	for _, id := range order {
		g, ok := known[id]
		if !ok {
			return nil, fmt.Errorf("device %q: %w", id, ErrNotFound)
		}
		next := max(g.gen, g.reported) + 1
		slots := slotsOf[id]
		for _, c := range byDevice[id] {
			slots = slices.DeleteFunc(slots, func(s DesiredSlot) bool { return s.Slot == c.Slot })
			if c.Set == nil {
				removed = append(removed, [2]string{id, c.Slot})
				continue
			}
			sl := *c.Set
			sl.Slot = c.Slot
			slots = append(slots, sl)
			health, ok := healthText[sl.Health]
			if !ok {
				var err error
				if health, err = encodeHealth(sl.Health); err != nil {
					return nil, fmt.Errorf("device %q: slot %s: %w", id, sl.Slot, err)
				}
				healthText[sl.Health] = health
			}
			slotRows = append(slotRows, []any{id, sl.Slot, sl.Model, sl.Version, sl.Digest, sl.Size, sl.RolloutID, sl.Rollback, health})
		}
		slices.SortFunc(slots, func(a, b DesiredSlot) int { return strings.Compare(a.Slot, b.Slot) })
		out = append(out, Desired{DeviceID: id, Generation: uint64(next), IssuedAt: issued, Slots: slots})
		genRows = append(genRows, []any{id, next})
	}
	if err := buildAll(out, build); err != nil {
		return nil, err
	}
	for _, d := range out {
		docRows = append(docRows, []any{d.DeviceID, int64(d.Generation), ms(issued), d.Doc, 0})
	}

	for _, r := range removed {
		if _, err := tx.ExecContext(ctx, `DELETE FROM desired_slots WHERE device_id = ? AND slot = ?`, r[0], r[1]); err != nil {
			return nil, fmt.Errorf("device %q: remove slot %s: %w", r[0], r[1], err)
		}
	}
	writes := []struct {
		what string
		b    *bulk
		rows [][]any
	}{
		{"desired slots", newBulk(tx, `INSERT INTO desired_slots (device_id, slot, model_name, model_version, digest, size, rollout_id, rollback, health) VALUES`, 9,
			`ON CONFLICT (device_id, slot) DO UPDATE SET model_name = excluded.model_name,
				model_version = excluded.model_version, digest = excluded.digest, size = excluded.size,
				rollout_id = excluded.rollout_id, rollback = excluded.rollback, health = excluded.health`), slotRows},
		{"generations", newBulk(tx, `WITH v(id, gen) AS (VALUES`, 2, `) UPDATE devices SET generation = v.gen FROM v WHERE devices.id = v.id`), genRows},
		{"desired states", newBulk(tx, `INSERT INTO desired_states (device_id, generation, issued_ms, doc, published) VALUES`, 5,
			`ON CONFLICT (device_id) DO UPDATE SET generation = excluded.generation, issued_ms = excluded.issued_ms,
				doc = excluded.doc, published = 0`), docRows},
	}
	for _, w := range writes {
		err := w.b.exec(ctx, w.rows)
		w.b.close()
		if err != nil {
			if isForeignKey(err) {
				return nil, fmt.Errorf("store %s: a model is not stored: %w", w.what, ErrNotFound)
			}
			return nil, fmt.Errorf("store %s: %w", w.what, err)
		}
	}
	return out, nil
}

func isForeignKey(err error) bool {
	return err != nil && strings.Contains(err.Error(), "FOREIGN KEY constraint failed")
}

const desiredSlotColumns = `slot, model_name, model_version, digest, size, rollout_id, rollback, health`

func scanDesiredSlot(row interface{ Scan(...any) error }, extra ...any) (DesiredSlot, error) {
	return scanDesiredSlotMemo(row, nil, extra...)
}

// scanDesiredSlotMemo is scanDesiredSlot sharing decoded health policies
// through memo (by their text): a wave's thousands of slots carry one.
func scanDesiredSlotMemo(row interface{ Scan(...any) error }, memo map[string]*HealthPolicy, extra ...any) (DesiredSlot, error) {
	var sl DesiredSlot
	var health string
	dst := append(extra, &sl.Slot, &sl.Model, &sl.Version, &sl.Digest, &sl.Size, &sl.RolloutID, &sl.Rollback, &health)
	if err := row.Scan(dst...); err != nil {
		return DesiredSlot{}, err
	}
	if health == "" {
		return sl, nil
	}
	if h, ok := memo[health]; ok {
		sl.Health = h
		return sl, nil
	}
	sl.Health = new(HealthPolicy)
	if err := json.Unmarshal([]byte(health), sl.Health); err != nil {
		return DesiredSlot{}, fmt.Errorf("slot %s: stored health policy: %w", sl.Slot, err)
	}
	if memo != nil {
		memo[health] = sl.Health
	}
	return sl, nil
}

func scanDesiredSlots(rows *sql.Rows, err error) ([]DesiredSlot, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []DesiredSlot
	for rows.Next() {
		sl, err := scanDesiredSlot(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, sl)
	}
	return out, rows.Err()
}

func encodeHealth(h *HealthPolicy) (string, error) {
	if h == nil {
		return "", nil
	}
	b, err := json.Marshal(h)
	if err != nil {
		return "", fmt.Errorf("encode health policy: %w", err)
	}
	return string(b), nil
}

// DesiredState returns the current desired state of a device. The error
// wraps ErrNotFound if none was ever issued.
func (s *Store) DesiredState(ctx context.Context, id string) (Desired, error) {
	d := Device{ID: id}
	if err := s.fillDetails(ctx, []*Device{&d}, `WHERE device_id = ?`, id); err != nil {
		return Desired{}, err
	}
	if d.Desired == nil {
		return Desired{}, fmt.Errorf("desired state of device %q: %w", id, ErrNotFound)
	}
	return *d.Desired, nil
}

// MarkPublished records that generation gen of a device's desired state
// reached the broker. A newer generation stored meanwhile stays unpublished.
func (s *Store) MarkPublished(ctx context.Context, id string, gen uint64) error {
	return s.MarkPublishedAll(ctx, []Published{{DeviceID: id, Generation: gen}})
}

// Published names one desired-state generation the broker acknowledged.
type Published struct {
	DeviceID   string
	Generation uint64
}

// MarkPublishedAll is MarkPublished for many documents in one transaction.
func (s *Store) MarkPublishedAll(ctx context.Context, docs []Published) error {
	if len(docs) == 0 {
		return nil
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		rows := make([][]any, len(docs))
		for i, p := range docs {
			rows[i] = []any{p.DeviceID, int64(p.Generation)}
		}
		b := newBulk(tx, `WITH v(id, gen) AS (VALUES`, 2,
			`) UPDATE desired_states SET published = 1 FROM v WHERE desired_states.device_id = v.id AND desired_states.generation = v.gen`)
		defer b.close()
		if err := b.exec(ctx, rows); err != nil {
			return fmt.Errorf("mark %d desired states published: %w", len(docs), err)
		}
		return nil
	})
}

// UnpublishedDesired returns the desired states the broker has not
// acknowledged, sorted by device id.
func (s *Store) UnpublishedDesired(ctx context.Context) ([]Desired, error) {
	return s.desiredDocs(ctx, `WHERE published = 0`)
}

// DesiredDocs returns every device's current desired state (without its
// slots), sorted by device id: what the embedded broker retains on the
// devices' desired topics.
func (s *Store) DesiredDocs(ctx context.Context) ([]Desired, error) {
	return s.desiredDocs(ctx, ``)
}

func (s *Store) desiredDocs(ctx context.Context, where string) ([]Desired, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT device_id, generation, issued_ms, doc FROM desired_states `+where+` ORDER BY device_id`)
	if err != nil {
		return nil, fmt.Errorf("list unpublished desired states: %w", err)
	}
	defer rows.Close()
	var out []Desired
	for rows.Next() {
		var d Desired
		var gen, issued int64
		if err := rows.Scan(&d.DeviceID, &gen, &issued, &d.Doc); err != nil {
			return nil, fmt.Errorf("list unpublished desired states: %w", err)
		}
		d.Generation, d.IssuedAt = uint64(gen), fromMS(issued)
		out = append(out, d)
	}
	return out, rows.Err()
}
