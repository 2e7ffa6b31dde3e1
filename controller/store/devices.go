package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Health values stored for a device.
const (
	HealthUnknown  = "unknown"
	HealthOK       = "ok"
	HealthDegraded = "degraded"
	HealthFailing  = "failing"
)

// LastEventsLimit is how many recent events Device and Devices load per device.
const LastEventsLimit = 10

// Report is what a device last reported about itself, from its hello or its
// retained state message.
type Report struct {
	// State is the serialized edgefleet.v1.ReportedState, kept verbatim so
	// fields this controller does not index are not lost.
	State              []byte
	Health             string
	ReportedGeneration uint64
	SpoolDepth         uint64
	// AgentVersion is updated only when not empty.
	AgentVersion string
}

// Hello is a device's hello message, as the inventory stores it.
type Hello struct {
	ID           string
	Labels       map[string]string
	AgentVersion string
	OS, Arch     string
	At           time.Time
	// Report is the state the hello carried; nil leaves the stored one.
	Report *Report
}

// Device is one device's inventory record.
type Device struct {
	ID           string
	Labels       map[string]string
	AgentVersion string
	OS, Arch     string
	Online       bool
	LastSeen     time.Time
	// State is the serialized edgefleet.v1.ReportedState, nil if none yet.
	State              []byte
	Health             string
	ReportedGeneration uint64
	SpoolDepth         uint64
	// Generation is the highest desired-state generation issued to it.
	Generation uint64
	// Desired is the current desired state, nil if none was ever issued.
	Desired         *Desired
	Inferences      int64
	InferenceErrors int64
	// LastEvents are the newest events first, at most LastEventsLimit.
	LastEvents []Event
	CreatedAt  time.Time
}

// Event is one deployment step a device reported.
type Event struct {
	DeviceID   string
	Kind       string
	Slot       string
	Model      string
	Version    string
	Generation uint64
	RolloutID  string
	Detail     string
	At         time.Time
}

// ensureDevice creates the device row if missing and moves last_seen
// forward to at; every message from a device goes through here first.
func (s *Store) ensureDevice(ctx context.Context, tx *sql.Tx, id string, at time.Time) error {
	_, err := tx.ExecContext(ctx, ensureDeviceSQL, id, s.now().UnixMilli(), ms(at))
	if err != nil {
		return fmt.Errorf("device %s: %w", id, err)
	}
	return nil
}

// The statements of device messages, shared by the one-message methods and
// ApplyDeviceUpdates (devices_batch.go).
const (
	ensureDeviceSQL = `
		INSERT INTO devices (id, created_ms, last_seen_ms) VALUES (?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms)`
	applyReportSQL = `
		UPDATE devices SET reported = ?, health = ?, reported_generation = ?, spool_depth = ?,
			agent_version = CASE WHEN ? = '' THEN agent_version ELSE ? END
		WHERE id = ?`
	setOnlineSQL   = `UPDATE devices SET online = ? WHERE id = ?`
	insertEventSQL = `
		INSERT INTO events (device_id, kind, slot, model, version, generation, rollout_id, detail, at_ms)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`
)

// reportArgs are applyReportSQL's arguments.
func reportArgs(id string, r *Report) []any {
	health := r.Health
	if health == "" {
		health = HealthUnknown
	}
	return []any{r.State, health, int64(r.ReportedGeneration), int64(r.SpoolDepth), r.AgentVersion, r.AgentVersion, id}
}

// eventArgs are insertEventSQL's arguments.
func eventArgs(e *Event) []any {
	return []any{e.DeviceID, e.Kind, e.Slot, e.Model, e.Version, int64(e.Generation), e.RolloutID, e.Detail, ms(e.At)}
}

func (s *Store) applyReport(ctx context.Context, tx *sql.Tx, id string, r *Report) error {
	_, err := tx.ExecContext(ctx, applyReportSQL, reportArgs(id, r)...)
	if err != nil {
		return fmt.Errorf("device %s: update reported state: %w", id, err)
	}
	return nil
}

// UpsertHello records a hello: it creates the device if new, replaces its
// labels, agent version and platform, marks it online, and stores the state
// the hello carried.
func (s *Store) UpsertHello(ctx context.Context, h Hello) error {
	return s.tx(ctx, func(tx *sql.Tx) error { return s.upsertHello(ctx, tx, h) })
}

func (s *Store) upsertHello(ctx context.Context, tx *sql.Tx, h Hello) error {
	if err := s.ensureDevice(ctx, tx, h.ID, h.At); err != nil {
		return err
	}
	if err := s.helloColumns(ctx, tx, h); err != nil {
		return err
	}
	if h.Report != nil {
		return s.applyReport(ctx, tx, h.ID, h.Report)
	}
	return nil
}

// helloColumns stores what a hello says besides its state, on a device
// row that exists.
func (s *Store) helloColumns(ctx context.Context, tx *sql.Tx, h Hello) error {
	labels, err := json.Marshal(nonNil(h.Labels))
	if err != nil {
		return fmt.Errorf("device %s: labels: %w", h.ID, err)
	}
	if _, err := tx.ExecContext(ctx, `
		UPDATE devices SET labels = ?, agent_version = ?, os = ?, arch = ?, online = 1 WHERE id = ?`,
		string(labels), h.AgentVersion, h.OS, h.Arch, h.ID); err != nil {
		return fmt.Errorf("device %s: update from hello: %w", h.ID, err)
	}
	return nil
}

// UpdateReport stores a device's reported state.
func (s *Store) UpdateReport(ctx context.Context, id string, at time.Time, r Report) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if err := s.ensureDevice(ctx, tx, id, at); err != nil {
			return err
		}
		return s.applyReport(ctx, tx, id, &r)
	})
}

// SetPresence stores whether a device is connected.
func (s *Store) SetPresence(ctx context.Context, id string, online bool, at time.Time) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if err := s.ensureDevice(ctx, tx, id, at); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, setOnlineSQL, online, id)
		return err
	})
}

// MarkAllOffline marks every device offline. The controller calls it when
// its embedded broker starts: no device can be connected to a broker that
// has just started, and each one announces itself again when it reconnects.
func (s *Store) MarkAllOffline(ctx context.Context) error {
	_, err := s.db.ExecContext(ctx, `UPDATE devices SET online = 0 WHERE online != 0`)
	return err
}

// AppendEvent stores one event of a device.
func (s *Store) AppendEvent(ctx context.Context, e Event, seen time.Time) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if err := s.ensureDevice(ctx, tx, e.DeviceID, seen); err != nil {
			return err
		}
		return insertEvent(ctx, tx, e)
	})
}

func insertEvent(ctx context.Context, tx *sql.Tx, e Event) error {
	_, err := tx.ExecContext(ctx, insertEventSQL, eventArgs(&e)...)
	if err != nil {
		return fmt.Errorf("device %s: insert event: %w", e.DeviceID, err)
	}
	return nil
}

const deviceColumns = `id, labels, agent_version, os, arch, online, last_seen_ms, reported, health,
	reported_generation, spool_depth, generation, inferences, inference_errors, created_ms`

func scanDevice(row interface{ Scan(...any) error }) (Device, error) {
	var (
		d                    Device
		labels               string
		lastSeen, created    int64
		repGen, spool, gen   int64
		reported             []byte
		online               bool
		inferences, infErrs  int64
		agentVer, osv, archv string
	)
	err := row.Scan(&d.ID, &labels, &agentVer, &osv, &archv, &online, &lastSeen, &reported, &d.Health,
		&repGen, &spool, &gen, &inferences, &infErrs, &created)
	if err != nil {
		return Device{}, err
	}
	if err := json.Unmarshal([]byte(labels), &d.Labels); err != nil {
		return Device{}, fmt.Errorf("device %s: stored labels: %w", d.ID, err)
	}
	d.Labels = nonNil(d.Labels)
	d.AgentVersion, d.OS, d.Arch = agentVer, osv, archv
	d.Online = online
	d.LastSeen = fromMS(lastSeen)
	d.State = reported
	d.ReportedGeneration = uint64(repGen)
	d.SpoolDepth = uint64(spool)
	d.Generation = uint64(gen)
	d.Inferences, d.InferenceErrors = inferences, infErrs
	d.CreatedAt = fromMS(created)
	return d, nil
}

// Device returns one device with its desired state and last events. The
// error wraps ErrNotFound for an unknown id.
func (s *Store) Device(ctx context.Context, id string) (Device, error) {
	d, err := scanDevice(s.db.QueryRowContext(ctx, `SELECT `+deviceColumns+` FROM devices WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Device{}, fmt.Errorf("device %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return Device{}, fmt.Errorf("device %q: %w", id, err)
	}
	devs := []*Device{&d}
	if err := s.fillDetails(ctx, devs, `WHERE device_id = ?`, id); err != nil {
		return Device{}, err
	}
	return d, nil
}

// Devices returns every device, sorted by id, with desired states and last
// events. Filtering by labels is the caller's: selectors are evaluated in Go.
func (s *Store) Devices(ctx context.Context) ([]Device, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+deviceColumns+` FROM devices ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	defer rows.Close()
	var out []Device
	for rows.Next() {
		d, err := scanDevice(rows)
		if err != nil {
			return nil, fmt.Errorf("list devices: %w", err)
		}
		out = append(out, d)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	devs := make([]*Device, len(out))
	for i := range out {
		devs[i] = &out[i]
	}
	if err := s.fillDetails(ctx, devs, ""); err != nil {
		return nil, err
	}
	return out, nil
}

// fillDetails loads desired states, desired slots and the last events of
// devs in three queries, whatever the number of devices. where restricts
// the rows (on device_id) and args are its parameters.
func (s *Store) fillDetails(ctx context.Context, devs []*Device, where string, args ...any) error {
	byID := make(map[string]*Device, len(devs))
	for _, d := range devs {
		byID[d.ID] = d
	}
	rows, err := s.db.QueryContext(ctx, `SELECT device_id, generation, issued_ms, doc, published FROM desired_states `+where, args...)
	if err != nil {
		return fmt.Errorf("load desired states: %w", err)
	}
	for rows.Next() {
		var ds Desired
		var gen, issued int64
		if err := rows.Scan(&ds.DeviceID, &gen, &issued, &ds.Doc, &ds.Published); err != nil {
			rows.Close()
			return fmt.Errorf("load desired states: %w", err)
		}
		ds.Generation, ds.IssuedAt = uint64(gen), fromMS(issued)
		if d := byID[ds.DeviceID]; d != nil {
			d.Desired = &ds
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load desired states: %w", err)
	}

	rows, err = s.db.QueryContext(ctx, `SELECT device_id, `+desiredSlotColumns+` FROM desired_slots `+where+` ORDER BY device_id, slot`, args...)
	if err != nil {
		return fmt.Errorf("load desired slots: %w", err)
	}
	for rows.Next() {
		var id string
		sl, err := scanDesiredSlot(rows, &id)
		if err != nil {
			rows.Close()
			return fmt.Errorf("load desired slots: %w", err)
		}
		if d := byID[id]; d != nil && d.Desired != nil {
			d.Desired.Slots = append(d.Desired.Slots, sl)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load desired slots: %w", err)
	}

	// A window function picks each device's newest events in one pass.
	rows, err = s.db.QueryContext(ctx, `
		SELECT device_id, kind, slot, model, version, generation, rollout_id, detail, at_ms FROM (
			SELECT *, ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY at_ms DESC, id DESC) AS n
			FROM events `+where+`
		) WHERE n <= ? ORDER BY device_id, at_ms DESC, id DESC`, append(args, LastEventsLimit)...)
	if err != nil {
		return fmt.Errorf("load events: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var e Event
		var gen, at int64
		if err := rows.Scan(&e.DeviceID, &e.Kind, &e.Slot, &e.Model, &e.Version, &gen, &e.RolloutID, &e.Detail, &at); err != nil {
			return fmt.Errorf("load events: %w", err)
		}
		e.Generation, e.At = uint64(gen), fromMS(at)
		if d := byID[e.DeviceID]; d != nil {
			d.LastEvents = append(d.LastEvents, e)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load events: %w", err)
	}
	return nil
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}
