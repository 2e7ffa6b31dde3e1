package deploy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/examples/testmodels"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Readings that grid-anomaly 1.0.0 and 1.1.0 classify alike (nominal) or
// apart (a frequency dip 1.1.0 weighs 2.5 times more: 0.17 vs 0.94).
var (
	nominal = [4]float32{230, 10, 50, 35}
	dip     = [4]float32{230, 10, 49.7, 35}
)

// run infers one request of rows through the manager, as the endpoint does.
func run(m *Manager, rows ...[4]float32) (Result, error) {
	vals := make([]float32, 0, 4*len(rows))
	for _, r := range rows {
		vals = append(vals, r[:]...)
	}
	in := []tensor.Tensor{tensor.FromFloat32("readings", []int64{int64(len(rows)), 4}, vals)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return m.Infer(ctx, "grid-anomaly", "", in)
}

// varied is the i-th of a stream of distinct, nominal-looking readings.
func varied(i int) [4]float32 {
	return [4]float32{225 + float32(i%97)*0.1, 10 + float32(i%13)*0.1, 50 + float32(i%7)*0.01, 35}
}

func with(a *pb.SlotAssignment, mod func(*pb.SlotAssignment)) *pb.SlotAssignment {
	c := protoClone(a)
	mod(c)
	return c
}

func protoClone(a *pb.SlotAssignment) *pb.SlotAssignment {
	return &pb.SlotAssignment{Slot: a.Slot, Model: &pb.ModelRef{Name: a.Model.Name, Version: a.Model.Version, BundleSha256: a.Model.BundleSha256},
		Url: a.Url, Size: a.Size, RolloutId: a.RolloutId, Rollback: a.Rollback, Health: a.Health}
}

// baseline makes 1.0.0 the slot's healthy version: assigned as a
// rollback, it is not watched.
func baseline(t *testing.T, f *fixture, m *Manager, ev *events) *pb.SlotAssignment {
	t.Helper()
	v1 := with(f.publish("default", "grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0")),
		func(a *pb.SlotAssignment) { a.Rollback, a.RolloutId = true, "r-base" })
	m.Offer(signed("dev-1", 1, v1))
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1).GetDetail(); !strings.Contains(d, "rollback ordered") {
		t.Fatalf("ACTIVATED detail %q", d)
	}
	if s := m.Slots()[0]; !s.GetHealthy() || s.GetRolloutId() != "r-base" {
		t.Fatalf("a rollback order's version is not healthy at once: %v", s)
	}
	return v1
}

func TestHealthWatchPasses(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	m, ev, _ := f.startWith(func(o *Options) { o.Health = HealthPolicy{Watch: 100 * time.Millisecond, MinInferences: 1} })
	v1 := f.publish("default", "grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v2 := with(f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0")), func(a *pb.SlotAssignment) {
		a.RolloutId, a.Health = "r-2", &pb.HealthPolicy{WatchMs: 300, MinInferences: 10}
	})

	// No traffic at all: the watch extends once, then passes (nothing
	// against the version), on the agent's default policy.
	m.Offer(signed("dev-1", 1, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)
	if s := m.Slots()[0]; s.GetHealthy() {
		t.Fatalf("healthy before its watch: %v", s)
	}
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_HEALTHY, 1).GetDetail(); !strings.Contains(d, "no inferences in 200ms") {
		t.Fatalf("HEALTHY detail %q", d)
	}

	start := time.Now()
	m.Offer(signed("dev-1", 2, v2))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
	s := m.Slots()[0]
	if s.GetHealthy() || s.GetPrevious().GetVersion() != "1.0.0" || s.GetRolloutId() != "r-2" {
		t.Fatalf("slot while watching %v", s)
	}
	if m.loadedIn("default", v1.Model.BundleSha256) == nil {
		t.Fatal("the previous version is not kept loaded during the watch")
	}
	for i := range 12 {
		if r, err := run(m, varied(i)); err != nil || r.Version != "1.1.0" {
			t.Fatalf("inference %d: %+v %v", i, r, err)
		}
	}
	he := ev.waitFor(t, pb.EventKind_EVENT_KIND_HEALTHY, 2)
	if time.Since(start) < 300*time.Millisecond {
		t.Fatalf("HEALTHY after %s, before the 300ms watch", time.Since(start))
	}
	if d := he.GetDetail(); !strings.Contains(d, "error rate 0.00 <= 0.05") || !strings.Contains(d, "over 12 inferences") || he.GetRolloutId() != "r-2" {
		t.Fatalf("HEALTHY %v", he)
	}
	s = m.Slots()[0]
	if !s.GetHealthy() || s.GetPrevious().GetVersion() != "1.0.0" {
		t.Fatalf("slot after the watch %v", s)
	}
	if m.loadedIn("default", v1.Model.BundleSha256) != nil {
		t.Fatal("the previous version stays loaded after the watch")
	}
	if !f.stored(v1.Model.BundleSha256) {
		t.Fatal("the previous version's bundle was deleted")
	}
}

// stored reports whether the data dir holds the bundle.
func (f *fixture) stored(digest string) bool {
	_, err := os.Stat(filepath.Join(f.dir, BundlesDir, digest+".bundle"))
	return err == nil
}

func TestHealthWatchRollsBack(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	m, ev, _ := f.start()
	baseline(t, f, m, ev)
	flaky := with(f.publish("default", "grid-anomaly", testmodels.Flaky, modeltest.BuildExample(t, "grid-anomaly", testmodels.Flaky)), func(a *pb.SlotAssignment) {
		a.RolloutId, a.Health = "r-flaky", &pb.HealthPolicy{WatchMs: 60_000, MaxErrorRate: 0.05, MinInferences: 40}
	})
	gen2 := signed("dev-1", 2, flaky)
	m.Offer(gen2)
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)

	start := time.Now()
	var flakyFailed, flakyOK int
	for i := 0; ; i++ {
		r, err := run(m, varied(i))
		if r.Version == "1.0.0" {
			break // rolled back
		}
		if err != nil {
			flakyFailed++
		} else {
			flakyOK++
		}
		if time.Since(start) > 20*time.Second {
			t.Fatalf("no rollback after %d failures in %d calls", flakyFailed, flakyFailed+flakyOK)
		}
	}
	rb := ev.waitFor(t, pb.EventKind_EVENT_KIND_ROLLED_BACK, 2)
	if d := rb.GetDetail(); !strings.Contains(d, "error rate") || !strings.Contains(d, "> 0.05 over") || !strings.HasSuffix(d, "rolled back to 1.0.0") ||
		rb.GetModel().GetVersion() != testmodels.Flaky || rb.GetRolloutId() != "r-flaky" {
		t.Fatalf("ROLLED_BACK %v", rb)
	}
	if flakyFailed == 0 || time.Since(start) > 10*time.Second {
		t.Fatalf("rolled back after %d failures in %s", flakyFailed, time.Since(start))
	}
	s := m.Slots()[0]
	if s.GetActive().GetVersion() != "1.0.0" || !s.GetHealthy() || !strings.Contains(s.GetLastError(), "rolled back") || s.GetPending() != nil {
		t.Fatalf("slot after the rollback %v", s)
	}
	for i := range 50 {
		if r, err := run(m, varied(i)); err != nil || r.Version != "1.0.0" {
			t.Fatalf("after the rollback: %+v %v", r, err)
		}
	}
	// Not activated again for the same generation, even when it is
	// delivered again (as the retained message is on every reconnect).
	m.Offer(gen2)
	time.Sleep(300 * time.Millisecond)
	if k := ev.kinds(2); k[len(k)-1] != pb.EventKind_EVENT_KIND_ROLLED_BACK {
		t.Fatalf("events of generation 2 after the rollback: %v", k)
	}
	// A new generation is the controller deciding again: it is installed.
	m.Offer(signed("dev-1", 3, flaky))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 3)
	if got := fmt.Sprint(ev.kinds(3)); got != "[EVENT_KIND_VERIFIED EVENT_KIND_ACTIVATED]" {
		t.Fatalf("re-install events %s: want no download", got)
	}
}

func TestHealthWatchLatencyBound(t *testing.T) {
	if raceEnabled {
		// The detector slows the host's Go code (tensor conversion) but
		// not the guest's, so the slow variant's extra compute drowns in
		// the host's instrumented overhead: nothing left to measure.
		t.Skip("latency comparison is meaningless under -race")
	}
	// Not parallel: it measures time.
	f := newFixture(t)
	// A deadline far off: on a busy machine a big request may take over
	// the default second, and a timeout would be an error, not latency.
	f.host = modeltest.NewHost(t, host.Options{PoolSize: 2, DefaultTimeout: time.Minute})
	m, ev, _ := f.start()
	baseline(t, f, m, ev)
	// Big requests, so the model's own compute dominates: the slow
	// variant takes about 3x as long for them.
	rows := make([][4]float32, 4000)
	for i := range rows {
		rows[i] = varied(i)
	}
	var base []time.Duration
	for range 21 {
		r, err := run(m, rows...)
		if err != nil {
			t.Fatal(err)
		}
		base = append(base, r.Latency)
	}
	slices.Sort(base)
	median := base[len(base)/2]
	bound := median + median/2
	t.Logf("1.0.0 takes %s per request (median); bound %s", median, bound)
	slow := with(f.publish("default", "grid-anomaly", testmodels.Slow, modeltest.BuildExample(t, "grid-anomaly", testmodels.Slow)), func(a *pb.SlotAssignment) {
		a.Health = &pb.HealthPolicy{WatchMs: 60_000, MinInferences: 10, MaxLatencyP99Ms: uint32(max(1, bound.Milliseconds()))}
	})
	if bound < time.Millisecond {
		t.Skipf("1.0.0 answers in %s: too fast for a millisecond bound", median)
	}
	m.Offer(signed("dev-1", 2, slow))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
	for i := 0; i < 100; i++ {
		if r, _ := run(m, rows...); r.Version == "1.0.0" {
			break
		}
	}
	rb := ev.waitFor(t, pb.EventKind_EVENT_KIND_ROLLED_BACK, 2)
	if d := rb.GetDetail(); !strings.Contains(d, "p99 latency") || !strings.Contains(d, "over 10 inferences") {
		t.Fatalf("ROLLED_BACK detail %q", d)
	}
}

// TestMisbehavingModels: a model that loops, grows memory without bound or
// traps on some input is rolled back once it does; one that answers wrong
// fails its self-test and is never activated. In every case the previous
// model keeps answering.
func TestMisbehavingModels(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	// A short deadline, so the loop costs little test time.
	f.host = modeltest.NewHost(t, host.Options{PoolSize: 2, DefaultTimeout: 100 * time.Millisecond})
	m, ev, _ := f.start()
	baseline(t, f, m, ev)
	trigger := testmodels.TriggerRow
	cases := []struct {
		version string
		errs    []error // what a triggered call may fail with
	}{
		{testmodels.Loop, []error{host.ErrTimeout}},
		// Out of memory, or out of time while filling it: contained either way.
		{testmodels.MemBomb, []error{host.ErrTrap, host.ErrTimeout}},
		{testmodels.Trap, []error{host.ErrTrap}},
		{testmodels.Wrong, nil}, // never activated
	}
	gen := uint64(1)
	for _, c := range cases {
		t.Run(c.version, func(t *testing.T) {
			gen++
			a := f.publish("default", "grid-anomaly", c.version, modeltest.BuildExample(t, "grid-anomaly", c.version))
			a.Health = &pb.HealthPolicy{WatchMs: 60_000, MinInferences: 20}
			m.Offer(signed("dev-1", gen, a))
			if c.errs == nil {
				fe := ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, gen)
				if !strings.Contains(fe.GetDetail(), "golden test") {
					t.Fatalf("FAILED detail %q", fe.GetDetail())
				}
				if k := fmt.Sprint(ev.kinds(gen)); strings.Contains(k, "ACTIVATED") {
					t.Fatalf("a model failing its self-test was activated: %s", k)
				}
				if r, err := run(m, nominal); err != nil || r.Version != "1.0.0" {
					t.Fatalf("after the refusal: %+v %v", r, err)
				}
				return
			}
			ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, gen)
			for i := range 5 { // it serves ordinary requests
				if r, err := run(m, varied(i)); err != nil || r.Version != c.version {
					t.Fatalf("ordinary request: %+v %v", r, err)
				}
			}
			var errs []error
			for len(errs) < 10 {
				r, err := run(m, trigger)
				if r.Version == "1.0.0" {
					break
				}
				if !slices.ContainsFunc(c.errs, func(e error) bool { return errors.Is(err, e) }) {
					t.Fatalf("triggered request: %+v, err %v, want one of %v", r, err, c.errs)
				}
				errs = append(errs, err)
			}
			rb := ev.waitFor(t, pb.EventKind_EVENT_KIND_ROLLED_BACK, gen)
			if d := rb.GetDetail(); !strings.Contains(d, "> 0.05 over") || !strings.Contains(d, "failed; more than 5% of the 20 needed") {
				t.Fatalf("ROLLED_BACK detail %q after %d errors", rb.GetDetail(), len(errs))
			}
			for i := range 20 {
				if r, err := run(m, varied(i)); err != nil || r.Version != "1.0.0" {
					t.Fatalf("the previous model does not answer: %+v %v", r, err)
				}
			}
			// The 1.0.0 model does not mind the trigger row.
			if r, err := run(m, trigger); err != nil || r.Version != "1.0.0" {
				t.Fatalf("1.0.0 on the trigger row: %+v %v", r, err)
			}
		})
	}
}

func TestWatchSurvivesRestart(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	m, ev, stop := f.start()
	baseline(t, f, m, ev)
	v2 := with(f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0")), func(a *pb.SlotAssignment) {
		a.RolloutId, a.Health = "r-2", &pb.HealthPolicy{WatchMs: 60_000, MinInferences: 1000}
	})
	m.Offer(signed("dev-1", 2, v2))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
	for i := range 10 {
		if _, err := run(m, varied(i)); err != nil {
			t.Fatal(err)
		}
	}
	stop()
	st, err := readState(filepath.Join(f.dir, StateFile))
	if err != nil {
		t.Fatal(err)
	}
	w := st.Slots["default"].Watch
	if w == nil || !w.Clean || w.Counts.Inferences != 10 || w.Restarts != 0 {
		t.Fatalf("watch record after a clean stop: %+v", w)
	}
	deadline := w.DeadlineUnixMs

	// A clean restart resumes the watch: counts, deadline, previous model
	// loaded for an instant rollback.
	m, _, stop = f.start()
	if c := m.Watches()["default"]; c.Inferences != 10 {
		t.Fatalf("watch counts after a restart: %+v", c)
	}
	if r, err := run(m, nominal); err != nil || r.Version != "1.1.0" {
		t.Fatalf("after a restart: %+v %v", r, err)
	}
	if m.loadedIn("default", st.Slots["default"].Previous.Digest) == nil {
		t.Fatal("previous version not loaded again for the resumed watch")
	}
	if s := m.Slots()[0]; s.GetHealthy() || s.GetRolloutId() != "r-2" {
		t.Fatalf("slot after a restart %v", s)
	}
	stop()

	// Deaths during the watch (no clean stop) count: the first one
	// resumes the watch, the third one rolls back before serving.
	die := func(restarts int) {
		st, err := readState(filepath.Join(f.dir, StateFile))
		if err != nil {
			t.Fatal(err)
		}
		st.Slots["default"].Watch.Clean = false
		st.Slots["default"].Watch.Restarts = restarts
		if err := writeState(filepath.Join(f.dir, StateFile), st); err != nil {
			t.Fatal(err)
		}
	}
	die(0)
	m, _, stop = f.start()
	if r, err := run(m, nominal); err != nil || r.Version != "1.1.0" {
		t.Fatalf("after a death: %+v %v", r, err)
	}
	stop()
	if st, _ := readState(filepath.Join(f.dir, StateFile)); st.Slots["default"].Watch.Restarts != 1 ||
		st.Slots["default"].Watch.DeadlineUnixMs != deadline || st.Slots["default"].Watch.Counts.Inferences != 12 {
		t.Fatalf("watch record after a death: %+v", st.Slots["default"].Watch)
	}
	die(maxWatchRestarts - 1)
	m, ev, _ = f.start()
	if r, err := run(m, nominal); err != nil || r.Version != "1.0.0" {
		t.Fatalf("after %d deaths: %+v %v, want the previous version", maxWatchRestarts, r, err)
	}
	rb := ev.waitFor(t, pb.EventKind_EVENT_KIND_ROLLED_BACK, 2)
	if !strings.Contains(rb.GetDetail(), "restarted 3 times") || rb.GetRolloutId() != "r-2" {
		t.Fatalf("ROLLED_BACK %v", rb)
	}
	time.Sleep(200 * time.Millisecond)
	if k := ev.kinds(2); len(k) != 1 {
		t.Fatalf("generation 2 after the rollback: %v (re-activated?)", k)
	}
	if s := m.Slots()[0]; !s.GetHealthy() || s.GetActive().GetVersion() != "1.0.0" || s.GetRolloutId() != "r-base" {
		t.Fatalf("slot after the rollback %v", s)
	}
}

func TestShadowPhase(t *testing.T) {
	t.Parallel()
	shadow := func(o *Options) {
		o.Shadow = func(a *pb.SlotAssignment) *ShadowPolicy {
			switch a.GetRolloutId() {
			case "shadow":
				return &ShadowPolicy{MinInferences: 20, MinAgreement: 0.9}
			}
			return nil
		}
	}
	type fx struct {
		f  *fixture
		m  *Manager
		ev *events
		v2 *pb.SlotAssignment
	}
	setup := func(t *testing.T, rollout string) fx {
		f := newFixture(t)
		m, ev, _ := f.startWith(shadow)
		baseline(t, f, m, ev)
		v2 := with(f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0")),
			func(a *pb.SlotAssignment) {
				a.RolloutId = rollout
				if rollout == "hold" { // only a desired state holds a candidate
					a.Shadow = &pb.ShadowPolicy{Hold: true}
				}
			})
		m.Offer(signed("dev-1", 2, v2))
		ev.waitFor(t, pb.EventKind_EVENT_KIND_VERIFIED, 2)
		deadline := time.Now().Add(30 * time.Second)
		for m.candidateOf("default") == nil {
			if time.Now().After(deadline) {
				t.Fatal("no shadow candidate")
			}
			time.Sleep(5 * time.Millisecond)
		}
		if s := m.Slots()[0]; s.GetPending().GetVersion() != "1.1.0" || s.GetActive().GetVersion() != "1.0.0" {
			t.Fatalf("slot in shadow %v", s)
		}
		return fx{f, m, ev, v2}
	}
	want10 := func(t *testing.T, m *Manager, row [4]float32) float32 {
		t.Helper()
		r, err := run(m, row)
		if err != nil || r.Version != "1.0.0" {
			t.Fatalf("in shadow: %+v %v", r, err)
		}
		v, _ := r.Outputs[0].Float32s()
		return v[0]
	}

	t.Run("agrees and switches", func(t *testing.T) {
		t.Parallel()
		x := setup(t, "shadow")
		for i := 0; ; i++ {
			r, err := run(x.m, varied(i))
			if err != nil {
				t.Fatal(err)
			}
			if r.Version == "1.1.0" {
				break // switched
			}
			if i > 5000 {
				t.Fatalf("no switch after %d calls: %+v", i, x.m.Shadows())
			}
		}
		ae := x.ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
		if d := ae.GetDetail(); !strings.Contains(d, "after the shadow phase: shadow agreement 1.000 over ") || !strings.Contains(d, "inferences (0 errors") {
			t.Fatalf("ACTIVATED detail %q", d)
		}
		if r, err := run(x.m, nominal); err != nil || r.Version != "1.1.0" {
			t.Fatalf("after the switch: %+v %v", r, err)
		}
		if len(x.m.Shadows()) != 0 {
			t.Fatalf("shadows after the switch: %v", x.m.Shadows())
		}
		if got := fmt.Sprint(x.ev.kinds(2)); got != "[EVENT_KIND_DOWNLOADING EVENT_KIND_VERIFIED EVENT_KIND_VERIFIED EVENT_KIND_ACTIVATED]" {
			t.Fatalf("events %s", got)
		}
	})

	t.Run("disagrees and is refused", func(t *testing.T) {
		t.Parallel()
		x := setup(t, "shadow")
		var answers []float32
		for i := 0; ; i++ {
			row := nominal
			if i%2 == 1 {
				row = dip // half the answers flip
			}
			answers = append(answers, want10(t, x.m, row))
			if len(x.ev.kinds(2)) > 3 { // DOWNLOADING, VERIFIED, VERIFIED (in shadow), then the verdict
				break
			}
			if i > 5000 {
				t.Fatalf("no verdict after %d calls: %+v", i, x.m.Shadows())
			}
		}
		// The caller only ever saw 1.0.0's answers: the dip scores low.
		if answers[1] > 0.5 {
			t.Fatalf("a dip scored %v: a candidate answer reached the caller", answers[1])
		}
		fe := x.ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, 2)
		if d := fe.GetDetail(); !strings.Contains(d, "shadow phase: shadow agreement 0.") || !strings.Contains(d, "< 0.900") {
			t.Fatalf("FAILED detail %q", d)
		}
		s := x.m.Slots()[0]
		if s.GetActive().GetVersion() != "1.0.0" || s.GetPending() != nil || !strings.Contains(s.GetLastError(), "refused grid-anomaly 1.1.0 after its shadow phase") {
			t.Fatalf("slot after the refusal %v", s)
		}
		time.Sleep(200 * time.Millisecond)
		if x.m.candidateOf("default") != nil || strings.Contains(fmt.Sprint(x.ev.kinds(2)), "ACTIVATED") {
			t.Fatalf("refused candidate tried again: %v", x.ev.kinds(2))
		}
	})

	t.Run("held until the controller switches", func(t *testing.T) {
		t.Parallel()
		x := setup(t, "hold")
		for i := range 300 {
			want10(t, x.m, varied(i))
		}
		deadline := time.Now().Add(10 * time.Second)
		for x.m.Shadows()["default"].Compared < 100 {
			if time.Now().After(deadline) {
				t.Fatalf("shadow figures %+v", x.m.Shadows())
			}
			time.Sleep(5 * time.Millisecond)
		}
		st := x.m.Shadows()["default"]
		if st.Agreement() != 1 || st.Candidate.Version != "1.1.0" || st.Active.Version != "1.0.0" || st.Offered != 300 || st.CandidateP99 == 0 {
			t.Fatalf("shadow figures %+v", st)
		}
		if x.m.activeRef("default").Version != "1.0.0" {
			t.Fatal("a held candidate switched by itself")
		}
		// The controller assigns it again without a shadow phase.
		m3 := with(x.v2, func(a *pb.SlotAssignment) { a.RolloutId = "switch" })
		x.m.Offer(signed("dev-1", 3, m3))
		ae := x.ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 3)
		if !strings.Contains(ae.GetDetail(), "switched by the controller after the shadow phase") {
			t.Fatalf("ACTIVATED %v", ae)
		}
		if got := fmt.Sprint(x.ev.kinds(3)); got != "[EVENT_KIND_ACTIVATED]" {
			t.Fatalf("switch events %s: want no download nor load", got)
		}
		if r, err := run(x.m, nominal); err != nil || r.Version != "1.1.0" {
			t.Fatalf("after the switch: %+v %v", r, err)
		}
	})
}

// TestInferIsOneVersion: calls racing 40 switches each get a whole answer
// from the version they name.
func TestInferIsOneVersion(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	m, ev, _ := f.start()
	v1 := with(baseline(t, f, m, ev), func(a *pb.SlotAssignment) { a.Rollback = false })
	v2 := f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0"))
	rows := [][4]float32{nominal, dip, {207, 18, 49.9, 42}}
	want := map[string][]float32{}
	for _, v := range []string{"1.0.0", "1.1.0"} {
		model, err := f.host.Load(t.Context(), modeltest.ExampleBundle(t, "grid-anomaly", v))
		if err != nil {
			t.Fatal(err)
		}
		var vals []float32
		for _, r := range rows {
			vals = append(vals, r[:]...)
		}
		out, err := model.Infer(t.Context(), []tensor.Tensor{tensor.FromFloat32("readings", []int64{3, 4}, vals)})
		if err != nil {
			t.Fatal(err)
		}
		want[v], _ = out[0].Float32s()
		model.Close(t.Context())
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[string]int{}
	var bad []string
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				r, err := run(m, rows...)
				got, _ := func() ([]float32, error) {
					if err != nil {
						return nil, err
					}
					return r.Outputs[0].Float32s()
				}()
				mu.Lock()
				seen[r.Version]++
				if err != nil || fmt.Sprint(got) != fmt.Sprint(want[r.Version]) {
					bad = append(bad, fmt.Sprintf("%s: %v %v", r.Version, got, err))
				}
				mu.Unlock()
			}
		})
	}
	for gen := uint64(2); gen <= 41; gen++ {
		a := v2
		if gen%2 == 1 {
			a = v1
		}
		m.Offer(signed("dev-1", gen, a))
		ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, gen)
	}
	cancel()
	wg.Wait()
	if len(bad) > 0 || seen["1.0.0"] == 0 || seen["1.1.0"] == 0 {
		t.Fatalf("answers by version %v; %d bad, first: %v", seen, len(bad), bad[:min(len(bad), 3)])
	}
}
