package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// DeviceUpdate is one message of a device, for ApplyDeviceUpdates: exactly
// one of Hello, Report, Online and Event is set.
type DeviceUpdate struct {
	ID string
	// At is when the device was seen; last_seen moves forward to it.
	At time.Time
	// Hello is a hello (its ID and At are ID and At).
	Hello *Hello
	// Report is a retained state message.
	Report *Report
	// Online is a presence message.
	Online *bool
	// Event is a deployment event (its DeviceID is ID).
	Event *Event
}

// DeviceUpdateResult is what ApplyDeviceUpdates learned about one update.
type DeviceUpdateResult struct {
	// DesiredGeneration is, for a hello, the generation of the device's
	// stored desired state (0: none), read in the same transaction, so
	// the caller can tell a device that is behind without another query.
	DesiredGeneration uint64
	// Skipped is set when a later update of the group made this one moot
	// (a state or presence overwritten before anyone could read it).
	Skipped bool
}

// ApplyDeviceUpdates stores many device messages in one transaction, in
// order, with one disk sync for all: the group commit of hellos, states,
// presences and events (controller/inventory). The stored result is the
// one of applying them one by one; updates whose every column a later
// update of the same device overwrites are not written at all (a state
// report followed by another, a presence followed by a hello). Events are
// all kept. On error nothing is stored.
func (s *Store) ApplyDeviceUpdates(ctx context.Context, us []DeviceUpdate) ([]DeviceUpdateResult, error) {
	res := make([]DeviceUpdateResult, len(us))
	if len(us) == 0 {
		return res, nil
	}
	// Walk backwards to find what a later update overwrites, and each
	// device's latest sighting, so its row is touched once.
	type later struct {
		report, agentVersion, online bool
		seen                         time.Time
		first                        int
	}
	devs := make(map[string]*later, len(us))
	for i := len(us) - 1; i >= 0; i-- {
		u := &us[i]
		if err := u.check(); err != nil {
			return nil, err
		}
		d := devs[u.ID]
		if d == nil {
			d = &later{seen: u.At}
			devs[u.ID] = d
		}
		d.first = i
		if u.At.After(d.seen) {
			d.seen = u.At
		}
		switch {
		case u.Hello != nil:
			d.online, d.agentVersion = true, true
			if u.Hello.Report != nil {
				d.report = true
			}
		case u.Report != nil:
			// A report sets agent_version only when it names one, so an
			// earlier one naming it must stay unless a later one does too.
			if d.report && (u.Report.AgentVersion == "" || d.agentVersion) {
				res[i].Skipped = true
			}
			d.report = true
			if u.Report.AgentVersion != "" {
				d.agentVersion = true
			}
		case u.Online != nil:
			res[i].Skipped = d.online
			d.online = true
		}
	}
	err := s.tx(ctx, func(tx *sql.Tx) error {
		st, err := prepareDeviceStatements(ctx, tx)
		if err != nil {
			return err
		}
		defer st.close()
		now := s.now().UnixMilli()
		for i := range us {
			u := &us[i]
			if d := devs[u.ID]; d.first == i {
				if _, err := st.ensure.ExecContext(ctx, u.ID, now, ms(d.seen)); err != nil {
					return fmt.Errorf("device %s: %w", u.ID, err)
				}
			}
			if res[i].Skipped {
				continue
			}
			switch {
			case u.Hello != nil:
				if err := s.helloColumns(ctx, tx, *u.Hello); err != nil {
					return err
				}
				if r := u.Hello.Report; r != nil {
					if _, err := st.report.ExecContext(ctx, reportArgs(u.ID, r)...); err != nil {
						return fmt.Errorf("device %s: update reported state: %w", u.ID, err)
					}
				}
				var gen int64
				err := st.desired.QueryRowContext(ctx, u.ID).Scan(&gen)
				if err != nil && !errors.Is(err, sql.ErrNoRows) {
					return fmt.Errorf("device %s: read desired generation: %w", u.ID, err)
				}
				res[i].DesiredGeneration = uint64(gen)
			case u.Report != nil:
				if _, err := st.report.ExecContext(ctx, reportArgs(u.ID, u.Report)...); err != nil {
					return fmt.Errorf("device %s: update reported state: %w", u.ID, err)
				}
			case u.Online != nil:
				if _, err := st.online.ExecContext(ctx, *u.Online, u.ID); err != nil {
					return fmt.Errorf("device %s: update presence: %w", u.ID, err)
				}
			case u.Event != nil:
				if _, err := st.event.ExecContext(ctx, eventArgs(u.Event)...); err != nil {
					return fmt.Errorf("device %s: insert event: %w", u.ID, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return res, nil
}

func (u *DeviceUpdate) check() error {
	n := 0
	for _, set := range []bool{u.Hello != nil, u.Report != nil, u.Online != nil, u.Event != nil} {
		if set {
			n++
		}
	}
	switch {
	case n != 1:
		return fmt.Errorf("device %s: an update carries %d messages, want exactly one", u.ID, n)
	case u.Hello != nil && u.Hello.ID != u.ID:
		return fmt.Errorf("device %s: the update carries a hello of device %s", u.ID, u.Hello.ID)
	case u.Event != nil && u.Event.DeviceID != u.ID:
		return fmt.Errorf("device %s: the update carries an event of device %s", u.ID, u.Event.DeviceID)
	}
	return nil
}

// deviceStatements are ApplyDeviceUpdates' statements, prepared once per
// group rather than once per message.
type deviceStatements struct {
	ensure, report, online, event, desired *sql.Stmt
}

func prepareDeviceStatements(ctx context.Context, tx *sql.Tx) (*deviceStatements, error) {
	st := &deviceStatements{}
	for _, p := range []struct {
		stmt **sql.Stmt
		sql  string
	}{
		{&st.ensure, ensureDeviceSQL},
		{&st.report, applyReportSQL},
		{&st.online, setOnlineSQL},
		{&st.event, insertEventSQL},
		{&st.desired, `SELECT generation FROM desired_states WHERE device_id = ?`},
	} {
		var err error
		if *p.stmt, err = tx.PrepareContext(ctx, p.sql); err != nil {
			st.close()
			return nil, fmt.Errorf("prepare device statements: %w", err)
		}
	}
	return st, nil
}

func (st *deviceStatements) close() {
	for _, s := range []*sql.Stmt{st.ensure, st.report, st.online, st.event, st.desired} {
		if s != nil {
			s.Close()
		}
	}
}
