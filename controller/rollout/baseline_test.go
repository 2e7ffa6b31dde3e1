package rollout

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// gt0 is "now" for the gate tests: a minute boundary.
var gt0 = time.Date(2026, 1, 5, 10, 0, 0, 0, time.UTC)

// gateTelemetry is a real store the gate tests fill with per-inference
// records, as agents without aggregates send them.
type gateTelemetry struct {
	t   *testing.T
	st  *store.Store
	seq map[string]uint64
}

func newGateTelemetry(t *testing.T) *gateTelemetry {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), "c.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &gateTelemetry{t: t, st: st, seq: map[string]uint64{}}
}

// put stores n inferences of m@version on dev in minute m, each
// latency plus up to 9 µs; every errEvery-th (0: none) fails with errText.
func (g *gateTelemetry) put(dev, version string, minute time.Time, n int, latency time.Duration, errEvery int, errText string) {
	g.t.Helper()
	var recs []store.TelemetryRecord
	for i := range n {
		g.seq[dev]++
		r := store.TelemetryRecord{Seq: g.seq[dev], Kind: store.RecordInference, Model: "m", Version: version,
			At: minute.Add(time.Duration(i) * 50 * time.Millisecond), LatencyUS: uint32(latency/time.Microsecond) + uint32(i%10)}
		if errEvery > 0 && i%errEvery == 0 {
			r.Error, r.LatencyUS = errText, 0
		}
		recs = append(recs, r)
	}
	if _, err := g.st.StoreTelemetry(context.Background(), dev, "e", minute, recs); err != nil {
		g.t.Fatal(err)
	}
}

// event stores a deployment event of dev at when.
func (g *gateTelemetry) event(dev, kind string, when time.Time) {
	g.t.Helper()
	if err := g.st.AppendEvent(context.Background(), store.Event{DeviceID: dev, Kind: kind, Slot: "default", Model: "m", At: when}, when); err != nil {
		g.t.Fatal(err)
	}
}

// input is wave 1 of a rollout of version that started 5 minutes before
// gt0, judged at gt0, over the store.
func (g *gateTelemetry) input(version string, activated, control map[string]time.Time) *GateInput {
	in := &GateInput{Model: "m", Version: version, Previous: []string{"1.0.0"}, Devices: map[string]bool{},
		Activated: activated, Control: control, Since: gt0.Add(-5 * time.Minute), Until: gt0, telemetry: g.st}
	in.BaselineSince = in.Since.Add(-time.Hour)
	for id := range activated {
		in.Devices[id] = true
	}
	return in
}

// TestLatencyComparisonWindows checks which device-minutes each side of
// the latency comparison counts.
func TestLatencyComparisonWindows(t *testing.T) {
	ctx := context.Background()
	g := newGateTelemetry(t)
	m := func(k int) time.Time { return gt0.Add(time.Duration(k) * time.Minute) }
	// The wave: w1 activated 2.0.0 at -4:30, w2 at -2:10. Both ran 1.0.0
	// cleanly in minute -7 (the fallback's) and -6 (ends before the wave
	// began at -5:00: counts too).
	for _, w := range []string{"w1", "w2"} {
		g.put(w, "1.0.0", m(-7), 50, time.Millisecond, 0, "")
		g.put(w, "1.0.0", m(-6), 50, time.Millisecond, 0, "")
		g.put(w, "1.0.0", m(-5), 50, 9*time.Millisecond, 0, "") // downloading 2.0.0: never counts
	}
	g.event("w1", "downloading", m(-5).Add(10*time.Second))
	g.event("w1", "activated", m(-5).Add(30*time.Second))
	g.put("w1", "2.0.0", m(-5), 40, 20*time.Millisecond, 0, "") // its activation minute
	g.put("w1", "2.0.0", m(-4), 60, 2*time.Millisecond, 0, "")
	g.put("w1", "2.0.0", m(-1), 60, 2*time.Millisecond, 0, "")
	g.put("w2", "2.0.0", m(-3), 40, 20*time.Millisecond, 0, "") // its activation minute
	g.put("w2", "2.0.0", m(-2), 60, 2*time.Millisecond, 0, "")
	// Outside the wave: c1 steady; c2 compiled something in minute -2
	// (its minute there does not count); c3 activated 1.0.0 in minute -4
	// (counts from -3); c4 runs 1.0.0 in a minute the candidate has none.
	for _, k := range []int{-4, -2, -1} {
		g.put("c1", "1.0.0", m(k), 100, time.Millisecond, 0, "")
		g.put("c2", "1.0.0", m(k), 100, time.Millisecond, 0, "")
		g.put("c3", "1.0.0", m(k), 100, time.Millisecond, 0, "")
	}
	g.put("c4", "1.0.0", m(-3), 100, time.Millisecond, 0, "")
	g.event("c2", "verified", m(-2).Add(5*time.Second))
	g.event("c2", "failed", m(-2).Add(40*time.Second))
	activated := map[string]time.Time{"w1": m(-5).Add(30 * time.Second), "w2": m(-3).Add(10 * time.Second)}

	t.Run("concurrent", func(t *testing.T) {
		in := g.input("2.0.0", activated, map[string]time.Time{"c1": m(-60), "c2": m(-60), "c3": m(-4).Add(20 * time.Second), "c4": m(-60)})
		c, err := in.Latency(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// Candidate: w1 in -4 and -1, w2 in -2: 180 samples, 3 minutes.
		// Baseline in those minutes: c1 in -4, -2, -1; c2 in -4, -1; c3 in
		// -2, -1.
		if c.Candidate.N() != 180 || c.Minutes != 3 || c.CandidateDevices != 2 {
			t.Errorf("candidate %d samples, %d minutes, %d devices; want 180, 3, 2", c.Candidate.N(), c.Minutes, c.CandidateDevices)
		}
		if !c.Concurrent || c.Baseline.N() != 700 || c.BaselineDevices != 3 || c.ControlDevices != 4 {
			t.Errorf("baseline concurrent=%v %d samples on %d of %d devices; want 700 on 3 of 4", c.Concurrent, c.Baseline.N(), c.BaselineDevices, c.ControlDevices)
		}
		if q := c.Candidate.Quantile(0.99); q > 3*time.Millisecond {
			t.Errorf("candidate p99 %v counts an activation minute", q)
		}
		if want := m(-3).Add(2*time.Minute + settleGrace); !c.Settled.Equal(want) {
			t.Errorf("settled %v, want %v", c.Settled, want)
		}
	})
	t.Run("fallback", func(t *testing.T) {
		c, err := g.input("2.0.0", activated, nil).Latency(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if c.Concurrent || c.Baseline.N() != 200 || c.BaselineDevices != 2 {
			t.Errorf("baseline concurrent=%v %d samples on %d devices; want the wave's 200 before it, on 2", c.Concurrent, c.Baseline.N(), c.BaselineDevices)
		}
		if q := c.Baseline.Quantile(0.99); q > 2*time.Millisecond {
			t.Errorf("baseline p99 %v counts the download minute", q)
		}
	})
}

// TestLatencyGateUndecided: too little on either side, or nothing to
// compare with, is inconclusive and says which; a baseline that may
// still come carries a Wait.
func TestLatencyGateUndecided(t *testing.T) {
	ctx := context.Background()
	g := newGateTelemetry(t)
	last := gt0.Add(-time.Minute)
	g.put("a", "2.0.0", last, 100, 2*time.Millisecond, 0, "")
	g.put("b", "1.0.0", last, 10, time.Millisecond, 0, "")
	g.put("c", "1.0.0", last, 450, time.Millisecond, 0, "")
	act := map[string]time.Time{"a": gt0.Add(-3 * time.Minute)}
	gate := &LatencyGate{MaxP95Ratio: 1.5, MinInferences: 50}
	for _, c := range []struct {
		name    string
		in      *GateInput
		detail  string
		waiting bool
	}{
		{"thin control", g.input("2.0.0", act, map[string]time.Time{"b": gt0.Add(-time.Hour)}),
			"insufficient baseline: 10 latency samples of 1.0.0 on 1 devices outside the wave in the same 1 minutes; need 50", true},
		{"control silent, no history", g.input("2.0.0", act, map[string]time.Time{"z": gt0.Add(-time.Hour)}),
			"insufficient baseline: none of the 1 devices outside the wave on 1.0.0 reported in the same 1 minutes, and the wave's own devices have 0 latency samples of it in the 1h0m0s before the wave; need 50", true},
		{"no control, no history", g.input("2.0.0", act, nil),
			"insufficient baseline: no device outside the wave runs 1.0.0, and the wave's own devices have 0", false},
		{"candidate activated this minute", g.input("2.0.0", map[string]time.Time{"a": last.Add(time.Second)}, map[string]time.Time{"b": gt0.Add(-time.Hour)}),
			"insufficient data: 0 latency samples of 2.0.0 on 0 of the wave's devices", true},
		// Enough for MinInferences, too few for a p95 while more are due
		// (a activated at -1:30: its next minute is stored by 0:20).
		{"few samples while more are due", g.input("2.0.0", map[string]time.Time{"a": gt0.Add(-90 * time.Second)}, map[string]time.Time{"c": gt0.Add(-time.Hour)}),
			"collecting: 100 latency samples of 2.0.0 and 450 of 1.0.0 so far; judging at 400 of each (20 beyond the p95), or at 10:00:20 with at least 50", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := gate.Evaluate(ctx, c.in)
			if v.Result != Inconclusive || !strings.Contains(v.Detail, c.detail) || v.Wait.IsZero() == c.waiting {
				t.Fatalf("verdict %s %q wait %v; want inconclusive with %q, waiting %v", v.Result, v.Detail, v.Wait, c.detail, c.waiting)
			}
		})
	}
	in := g.input("2.0.0", act, nil)
	in.Previous = nil
	if v := gate.Evaluate(ctx, in); v.Result != Inconclusive || !strings.Contains(v.Detail, "ran no earlier version of m") {
		t.Fatalf("verdict without a previous version %s %q", v.Result, v.Detail)
	}
}

func TestLatencyDist(t *testing.T) {
	var d LatencyDist
	if d.Quantile(0.5) != 0 || d.N() != 0 {
		t.Fatal("an empty distribution has figures")
	}
	h := &pb.Histogram{Bounds: []float64{1000, 2000, 4000}, Counts: []uint64{0, 90, 9, 1}}
	if n := d.add(h); n != 100 {
		t.Fatalf("add counted %d", n)
	}
	d.add(&pb.Histogram{Bounds: []float64{1}, Counts: []uint64{1}}) // malformed: ignored
	for q, want := range map[float64]time.Duration{0.5: 1500 * time.Microsecond, 0.95: 3 * time.Millisecond, 1: 4 * time.Millisecond} {
		if got := d.Quantile(q); got != want {
			t.Errorf("Quantile(%v) = %v, want %v", q, got, want)
		}
	}
	// Merging more keeps it exact: the bucket middles of both add up.
	d.add(summary.NewLatency())
	if d.N() != 100 {
		t.Fatalf("an empty histogram changed the count to %d", d.N())
	}
}
