package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
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
}

// BuildFunc fills in d.Doc for a desired state whose generation, issue time
// and slots the store has just chosen. It runs inside the transaction, so
// the document and the generation it names commit together.
type BuildFunc func(d *Desired) error

// Assign puts slot into the desired state of each device in ids: per
// device, it takes the next generation (above both the last one issued and
// the one the device reports, so a controller restored from an old backup
// never issues a generation the agent would refuse as a replay), replaces
// that slot, lets build make the document, and stores it unpublished. All
// devices commit in one transaction, or none does. The error wraps
// ErrNotFound if a device or the slot's model is unknown.
func (s *Store) Assign(ctx context.Context, ids []string, slot DesiredSlot, issued time.Time, build BuildFunc) ([]Desired, error) {
	out := make([]Desired, 0, len(ids))
	err := s.tx(ctx, func(tx *sql.Tx) error {
		out = out[:0]
		for _, id := range ids {
			var gen, repGen int64
			err := tx.QueryRowContext(ctx, `SELECT generation, reported_generation FROM devices WHERE id = ?`, id).Scan(&gen, &repGen)
			if errors.Is(err, sql.ErrNoRows) {
				return fmt.Errorf("device %q: %w", id, ErrNotFound)
			}
			if err != nil {
				return fmt.Errorf("device %q: %w", id, err)
			}
			next := max(gen, repGen) + 1
			slots, err := desiredSlots(ctx, tx, id)
			if err != nil {
				return err
			}
			slots = slices.DeleteFunc(slots, func(s DesiredSlot) bool { return s.Slot == slot.Slot })
			slots = append(slots, slot)
			slices.SortFunc(slots, func(a, b DesiredSlot) int { return strings.Compare(a.Slot, b.Slot) })

			d := Desired{DeviceID: id, Generation: uint64(next), IssuedAt: issued, Slots: slots}
			if err := build(&d); err != nil {
				return fmt.Errorf("device %q: build desired state: %w", id, err)
			}
			if _, err := tx.ExecContext(ctx, `UPDATE devices SET generation = ? WHERE id = ?`, next, id); err != nil {
				return fmt.Errorf("device %q: %w", id, err)
			}
			if _, err := tx.ExecContext(ctx, `
				INSERT INTO desired_slots (device_id, slot, model_name, model_version, digest, size) VALUES (?, ?, ?, ?, ?, ?)
				ON CONFLICT (device_id, slot) DO UPDATE SET model_name = excluded.model_name,
					model_version = excluded.model_version, digest = excluded.digest, size = excluded.size`,
				id, slot.Slot, slot.Model, slot.Version, slot.Digest, slot.Size); err != nil {
				if isForeignKey(err) {
					return fmt.Errorf("model %s@%s: %w", slot.Model, slot.Version, ErrNotFound)
				}
				return fmt.Errorf("device %q: store slot %s: %w", id, slot.Slot, err)
			}
			if _, err := tx.ExecContext(ctx, `
				INSERT INTO desired_states (device_id, generation, issued_ms, doc, published) VALUES (?, ?, ?, ?, 0)
				ON CONFLICT (device_id) DO UPDATE SET generation = excluded.generation, issued_ms = excluded.issued_ms,
					doc = excluded.doc, published = 0`,
				id, next, ms(issued), d.Doc); err != nil {
				return fmt.Errorf("device %q: store desired state: %w", id, err)
			}
			out = append(out, d)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func isForeignKey(err error) bool {
	return err != nil && strings.Contains(err.Error(), "FOREIGN KEY constraint failed")
}

func desiredSlots(ctx context.Context, tx *sql.Tx, id string) ([]DesiredSlot, error) {
	rows, err := tx.QueryContext(ctx, `SELECT slot, model_name, model_version, digest, size FROM desired_slots WHERE device_id = ? ORDER BY slot`, id)
	if err != nil {
		return nil, fmt.Errorf("device %q: load desired slots: %w", id, err)
	}
	defer rows.Close()
	var out []DesiredSlot
	for rows.Next() {
		var sl DesiredSlot
		if err := rows.Scan(&sl.Slot, &sl.Model, &sl.Version, &sl.Digest, &sl.Size); err != nil {
			return nil, fmt.Errorf("device %q: load desired slots: %w", id, err)
		}
		out = append(out, sl)
	}
	return out, rows.Err()
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
	_, err := s.db.ExecContext(ctx, `UPDATE desired_states SET published = 1 WHERE device_id = ? AND generation = ?`, id, int64(gen))
	if err != nil {
		return fmt.Errorf("device %q: mark generation %d published: %w", id, gen, err)
	}
	return nil
}

// UnpublishedDesired returns the desired states the broker has not
// acknowledged, sorted by device id.
func (s *Store) UnpublishedDesired(ctx context.Context) ([]Desired, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT device_id, generation, issued_ms, doc FROM desired_states WHERE published = 0 ORDER BY device_id`)
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
