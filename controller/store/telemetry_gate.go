package store

import (
	"context"
	"fmt"
	"time"
)

// What the rollout gates read besides the minute aggregates: when each
// device was busy installing. A device that downloads, verifies, compiles
// and switches a model serves its inferences meanwhile, on the same CPU,
// so its latencies in those minutes say more about the install than about
// the model; the latency gate leaves such device-minutes out of both
// sides of its comparison (controller/rollout/baseline.go).

// InstallSpan is a stretch of time in which a device was installing or
// activating a model version in Slot (or restarting its agent).
type InstallSpan struct {
	Slot     string
	From, To time.Time
}

// Overlaps reports whether the span touches [from, to).
func (s InstallSpan) Overlaps(from, to time.Time) bool {
	return !s.To.Before(from) && s.From.Before(to)
}

// InstallLookback is how far before the window InstallSpans reads events,
// so an install that began before the window and ends in it is seen whole.
const InstallLookback = 30 * time.Minute

// MaxInstallSpan bounds a span whose end was never reported (a device
// that went away mid-install, an agent release, whose new binary reports
// healthy rather than activated): past it the device counts as settled
// again, rather than being left out for good.
const MaxInstallSpan = 15 * time.Minute

// Deployment event kinds as stored (inventory.EventKindName): those that
// start an install, and those that end one.
var (
	installStarts = map[string]bool{"downloading": true, "verified": true}
	installEnds   = map[string]bool{"activated": true, "failed": true, "refused": true, "rolled-back": true, "agent-restarting": true}
)

// InstallSpans returns, for each device of ids that has any, the install
// spans overlapping [since, until], read from the devices' deployment
// events (device clock, like the telemetry minutes): from a
// "downloading" or "verified" event to the "activated", "failed",
// "refused", "rolled-back" or "agent-restarting" event that ends it in the
// same slot. An end without a start seen (up to InstallLookback before
// since) is a span of its own instant; a start without an end lasts until
// until, at most MaxInstallSpan.
func (s *Store) InstallSpans(ctx context.Context, ids []string, since, until time.Time) (map[string][]InstallSpan, error) {
	out := map[string][]InstallSpan{}
	if len(ids) == 0 {
		return out, nil
	}
	rows, err := s.db.QueryContext(ctx, `SELECT device_id, kind, slot, at_ms FROM events
		WHERE device_id IN (SELECT value FROM json_each(?)) AND at_ms >= ? AND at_ms <= ?
		ORDER BY device_id, at_ms, id`, jsonList(ids), since.Add(-InstallLookback).UnixMilli(), until.UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("read deployment events of %d devices: %w", len(ids), err)
	}
	defer rows.Close()
	dev := ""
	open := map[string]time.Time{} // slot -> start of the install under way
	add := func(id, slot string, from, to time.Time) {
		if to.Before(since) || from.After(until) {
			return
		}
		out[id] = append(out[id], InstallSpan{Slot: slot, From: from, To: to})
	}
	flush := func() {
		for slot, from := range open {
			add(dev, slot, from, minTime(until, from.Add(MaxInstallSpan)))
		}
		clear(open)
	}
	for rows.Next() {
		var id, kind, slot string
		var at int64
		if err := rows.Scan(&id, &kind, &slot, &at); err != nil {
			return nil, fmt.Errorf("read deployment events: %w", err)
		}
		if id != dev {
			flush()
			dev = id
		}
		t := fromMS(at)
		switch {
		case installStarts[kind]:
			if from, ok := open[slot]; ok && t.Sub(from) > MaxInstallSpan {
				add(id, slot, from, from.Add(MaxInstallSpan))
				delete(open, slot)
			}
			if _, ok := open[slot]; !ok {
				open[slot] = t
			}
		case installEnds[kind]:
			from, ok := open[slot]
			if !ok || t.Sub(from) > MaxInstallSpan {
				if ok {
					add(id, slot, from, from.Add(MaxInstallSpan))
				}
				from = t
			}
			delete(open, slot)
			add(id, slot, from, t)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read deployment events: %w", err)
	}
	flush()
	return out, nil
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
