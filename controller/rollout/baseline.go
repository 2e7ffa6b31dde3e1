package rollout

import (
	"context"
	"fmt"
	"maps"
	"math"
	"slices"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// What the latency gate compares, and why (RATIONALE.md, "The latency
// gate compares the same minutes, on devices that are not installing").
//
// Telemetry is stored per device and minute, so a minute is the finest
// unit the gate can keep or leave out. Latency on a device is only worth
// comparing when the device is not installing anything: downloading,
// verifying and compiling a bundle share the device's CPU with the
// inferences it serves meanwhile. So, as canary analysis does (Kayenta,
// Argo Rollouts, Flagger), both sides come from the same minutes:
//
//   - Candidate: the new version's minutes on the wave's devices that
//     activated it, leaving out, per device, the minute it activated in
//     (partial, and the first calls of a fresh instance) and every minute
//     an install span of that device touches.
//   - Baseline: the previous versions' minutes in exactly those minutes,
//     on the control cohort (GateInput.Control: the rollout's devices
//     outside the wave that run a previous version), leaving out, per
//     device, the minutes up to the one it activated that version in and
//     every minute an install span touches.
//   - Fallback, only when the control cohort has no such minutes at all
//     (the last wave, or the rest of the fleet offline): the wave's own
//     devices' previous-version minutes that ended before the wave
//     started, back to BaselineSince, install spans left out. The verdict
//     says the baseline is not concurrent.

// settleGrace is how long after a minute ends its aggregates are taken
// to be stored: the agent sends its own at the minute's end, and the
// batch is acknowledged in a group commit.
const settleGrace = 20 * time.Second

// LatencyComparison is what the latency gate judges.
type LatencyComparison struct {
	Candidate, Baseline LatencyDist
	// CandidateDevices and BaselineDevices count the devices with latency
	// samples on each side; Minutes the distinct minutes of the
	// candidate's samples.
	CandidateDevices, BaselineDevices, Minutes int
	// ControlDevices counts the control cohort (GateInput.Control).
	ControlDevices int
	// Concurrent is set when the baseline is the control cohort over the
	// candidate's own minutes; otherwise it is the fallback.
	Concurrent bool
	// Skipped counts the device-minutes left out as install or
	// activation minutes, on both sides.
	Skipped int
	// Settled is when the minute after the last activation in the wave is
	// stored: the first time every activated device can have a minute
	// that counts.
	Settled time.Time
}

// LatencyDist is a latency distribution summed from minute histograms,
// each bucket counted at its middle.
type LatencyDist struct {
	counts map[uint32]uint64 // microseconds -> inferences
	us     []uint32          // the keys, ascending; nil until needed
	n      uint64
}

// N is how many latencies the distribution holds.
func (d *LatencyDist) N() int { return int(min(d.n, math.MaxInt32)) }

// add counts h in and returns how many latencies it held.
func (d *LatencyDist) add(h *pb.Histogram) uint64 {
	if len(h.GetBounds()) == 0 || len(h.GetCounts()) != len(h.GetBounds())+1 {
		return 0
	}
	if d.counts == nil {
		d.counts = map[uint32]uint64{}
	}
	var total uint64
	for i, c := range h.GetCounts() {
		if c == 0 {
			continue
		}
		v := summary.Midpoint(h.Bounds, i)
		d.counts[uint32(min(max(v, 0), math.MaxUint32))] += c
		total += c
	}
	d.n += total
	d.us = nil
	return total
}

// Quantile returns the q-quantile by nearest rank, 0 if empty.
func (d *LatencyDist) Quantile(q float64) time.Duration {
	if d.n == 0 {
		return 0
	}
	if d.us == nil {
		d.us = slices.Sorted(maps.Keys(d.counts))
	}
	rank := uint64(math.Ceil(q * float64(d.n)))
	rank = min(max(rank, 1), d.n)
	var seen uint64
	for _, us := range d.us {
		seen += d.counts[us]
		if seen >= rank {
			return time.Duration(us) * time.Microsecond
		}
	}
	return time.Duration(d.us[len(d.us)-1]) * time.Microsecond
}

func minuteStart(t time.Time) time.Time { return t.Truncate(time.Minute) }

// settledAfter reports whether minute m starts after the minute of t,
// the device's activation (zero: unknown, then the wave's start counts).
func settledAfter(m, t, fallback time.Time) bool {
	if t.IsZero() {
		t = fallback
	}
	return !m.Before(minuteStart(t).Add(time.Minute))
}

func compareLatency(ctx context.Context, in *GateInput) (LatencyComparison, error) {
	c := LatencyComparison{ControlDevices: len(in.Control)}
	wave := slices.Sorted(maps.Keys(in.Devices))
	control := slices.Sorted(maps.Keys(in.Control))
	for _, id := range wave {
		at := in.Activated[id]
		if at.IsZero() {
			at = in.Until
		}
		if s := minuteStart(at).Add(2*time.Minute + settleGrace); s.After(c.Settled) {
			c.Settled = s
		}
	}
	if len(wave) == 0 {
		return c, nil
	}
	spans, err := in.telemetry.InstallSpans(ctx, append(slices.Clone(wave), control...), in.BaselineSince, in.Until)
	if err != nil {
		return c, err
	}
	busy := func(id string, m time.Time) bool {
		for _, s := range spans[id] {
			if s.Overlaps(m, m.Add(time.Minute)) {
				return true
			}
		}
		return false
	}

	// The candidate, and the minutes it has latencies in.
	ms, err := in.telemetry.Minutes(ctx, store.MinuteQuery{Model: in.Model, Version: in.Version, DeviceIDs: wave, Since: in.Since, Until: in.Until})
	if err != nil {
		return c, fmt.Errorf("read minutes of %s@%s: %w", in.Model, in.Version, err)
	}
	minutes := map[int64]bool{}
	devs := map[string]bool{}
	var first, last time.Time
	for _, m := range store.Authoritative(ms) {
		if !in.Devices[m.DeviceID] {
			continue
		}
		if !settledAfter(m.Start, in.Activated[m.DeviceID], in.Since) || busy(m.DeviceID, m.Start) {
			c.Skipped++
			continue
		}
		if c.Candidate.add(m.Aggregate.GetLatencyUs()) == 0 {
			continue
		}
		devs[m.DeviceID] = true
		minutes[m.Start.UnixMilli()] = true
		if first.IsZero() || m.Start.Before(first) {
			first = m.Start
		}
		if m.Start.After(last) {
			last = m.Start
		}
	}
	c.CandidateDevices, c.Minutes = len(devs), len(minutes)
	if len(minutes) == 0 {
		return c, nil
	}

	// The control cohort over the same minutes.
	base := map[string]bool{}
	if len(control) > 0 {
		for _, v := range in.Previous {
			if v == in.Version {
				continue
			}
			ms, err := in.telemetry.Minutes(ctx, store.MinuteQuery{Model: in.Model, Version: v, DeviceIDs: control, Since: first, Until: last})
			if err != nil {
				return c, fmt.Errorf("read minutes of %s@%s: %w", in.Model, v, err)
			}
			for _, m := range store.Authoritative(ms) {
				act, ok := in.Control[m.DeviceID]
				if !ok || !minutes[m.Start.UnixMilli()] {
					continue
				}
				if !settledAfter(m.Start, act, in.Since) || busy(m.DeviceID, m.Start) {
					c.Skipped++
					continue
				}
				if c.Baseline.add(m.Aggregate.GetLatencyUs()) > 0 {
					base[m.DeviceID] = true
				}
			}
		}
		if c.Baseline.N() > 0 {
			c.Concurrent, c.BaselineDevices = true, len(base)
			return c, nil
		}
	}

	// Fallback: the wave's own devices before the wave.
	before := minuteStart(in.Since).Add(-time.Minute) // the last minute that ended before the wave began
	if before.Before(in.BaselineSince) {
		return c, nil
	}
	for _, v := range in.Previous {
		if v == in.Version {
			continue
		}
		ms, err := in.telemetry.Minutes(ctx, store.MinuteQuery{Model: in.Model, Version: v, DeviceIDs: wave, Since: in.BaselineSince, Until: before})
		if err != nil {
			return c, fmt.Errorf("read minutes of %s@%s: %w", in.Model, v, err)
		}
		for _, m := range store.Authoritative(ms) {
			if !in.Devices[m.DeviceID] || m.Start.After(before) {
				continue
			}
			if busy(m.DeviceID, m.Start) {
				c.Skipped++
				continue
			}
			if c.Baseline.add(m.Aggregate.GetLatencyUs()) > 0 {
				base[m.DeviceID] = true
			}
		}
	}
	c.BaselineDevices = len(base)
	return c, nil
}
