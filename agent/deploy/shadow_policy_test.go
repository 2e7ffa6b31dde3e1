package deploy

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

func TestShadowPolicyFrom(t *testing.T) {
	local := &ShadowPolicy{MinInferences: 40, MaxDuration: time.Minute, MinAgreement: 0.9, Tolerance: 0.2}
	cases := []struct {
		name  string
		p     *pb.ShadowPolicy
		local *ShadowPolicy
		want  ShadowPolicy
	}{
		{"empty, no local: defaults", &pb.ShadowPolicy{}, nil, ShadowPolicy{MinInferences: 100, MaxDuration: 10 * time.Minute, MinAgreement: 0.98, Tolerance: 0.05}},
		{"empty: the agent's configuration", &pb.ShadowPolicy{}, local, *local},
		{"the desired state wins", &pb.ShadowPolicy{MinInferences: 7, MaxMs: 1500, MinAgreement: 0.99, Tolerance: 0.01, Hold: true}, local,
			ShadowPolicy{MinInferences: 7, MaxDuration: 1500 * time.Millisecond, MinAgreement: 0.99, Tolerance: 0.01, Hold: true}},
		{"partly set", &pb.ShadowPolicy{MinAgreement: 0.995}, local, ShadowPolicy{MinInferences: 40, MaxDuration: time.Minute, MinAgreement: 0.995, Tolerance: 0.2}},
		{"hold is the desired state's alone", &pb.ShadowPolicy{}, &ShadowPolicy{Hold: true}, ShadowPolicy{MinInferences: 100, MaxDuration: 10 * time.Minute, MinAgreement: 0.98, Tolerance: 0.05}},
		{"nonsense falls back", &pb.ShadowPolicy{MinAgreement: 7, Tolerance: -1}, local, *local},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := ShadowPolicyFrom(c.p, c.local); got != c.want {
				t.Fatalf("ShadowPolicyFrom = %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestShadowReportDue(t *testing.T) {
	var due []uint64
	for n := range uint64(170) {
		if shadowReportDue(n, 20) {
			due = append(due, n)
		}
	}
	if got := fmt.Sprint(due); got != "[1 20 40 80 160]" {
		t.Fatalf("reports at %s, want [1 20 40 80 160]", got)
	}
	if !shadowReportDue(2, 0) || !shadowReportDue(4, 0) || shadowReportDue(3, 0) {
		t.Fatal("a zero minimum reports at powers of two")
	}
}

// TestDesiredShadowPolicy: with no shadow configured on the agent, the
// desired state's ShadowPolicy puts a candidate in shadow, held; its
// figures are in the reported state; a later generation with hold=false
// lets the agent judge it.
func TestDesiredShadowPolicy(t *testing.T) {
	t.Parallel()
	type fx struct {
		m  *Manager
		ev *events
		v2 *pb.SlotAssignment
	}
	setup := func(t *testing.T) fx {
		f := newFixture(t)
		m, ev, _ := f.start() // no Options.Shadow: only the desired state asks
		baseline(t, f, m, ev)
		v2 := with(f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0")), func(a *pb.SlotAssignment) {
			a.RolloutId = "r-shadow"
			a.Shadow = &pb.ShadowPolicy{MinInferences: 10, Hold: true}
		})
		m.Offer(signed("dev-1", 2, v2))
		var started *pb.Event
		deadline := time.Now().Add(60 * time.Second)
		for started == nil {
			for _, e := range ev.all() {
				if e.GetKind() == pb.EventKind_EVENT_KIND_VERIFIED && e.GetGeneration() == 2 && strings.Contains(e.GetDetail(), "shadow phase started") {
					started = e
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no shadow phase: %v", ev.all())
			}
			time.Sleep(5 * time.Millisecond)
		}
		if d := started.GetDetail(); !strings.Contains(d, "beside 1.0.0; held: the controller judges") || started.GetRolloutId() != "r-shadow" {
			t.Fatalf("shadow start event %v", started)
		}
		return fx{m, ev, v2}
	}
	// shadowState waits until the reported state shows at least n
	// comparisons, and returns it.
	shadowState := func(t *testing.T, m *Manager, n uint64) *pb.SlotState {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			s := m.Slots()[0]
			if s.GetShadow().GetCompared() >= n {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("reported state never had %d comparisons: %v", n, s)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	t.Run("held, reported, then judged by the agent", func(t *testing.T) {
		t.Parallel()
		x := setup(t)
		before := x.ev.states.Load()
		for i := range 200 {
			if r, err := run(x.m, varied(i)); err != nil || r.Version != "1.0.0" {
				t.Fatalf("in shadow: %+v %v", r, err)
			}
		}
		// Calls the candidate is too busy for are skipped (never slowing
		// the live path): on a loaded machine not all 200 are compared.
		s := shadowState(t, x.m, 20)
		sh := s.GetShadow()
		if st := x.m.Shadows()["default"]; st.Offered != 200 || st.Compared+st.Skipped > 200 {
			t.Fatalf("shadow figures %+v", st)
		}
		if s.GetActive().GetVersion() != "1.0.0" || s.GetPending().GetVersion() != "1.1.0" ||
			sh.GetCandidate().GetVersion() != "1.1.0" || sh.GetAgreed() != sh.GetCompared() || sh.GetErrors() != 0 ||
			sh.GetCandidateP99Us() == 0 || sh.GetActiveP99Us() == 0 || sh.GetSinceUnixMs() == 0 {
			t.Fatalf("held slot %v", s)
		}
		if x.ev.states.Load() == before {
			t.Fatal("no state report while the figures grew")
		}
		// Far past min_inferences, still held: the agent does not judge.
		time.Sleep(100 * time.Millisecond)
		if k := fmt.Sprint(x.ev.kinds(2)); strings.Contains(k, "ACTIVATED") || strings.Contains(k, "FAILED") {
			t.Fatalf("a held candidate was judged: %s", k)
		}

		// Generation 3 releases it: the agent judges against its terms,
		// the figures so far included.
		v3 := with(x.v2, func(a *pb.SlotAssignment) {
			a.Shadow = &pb.ShadowPolicy{MinInferences: 10, MinAgreement: 0.9}
		})
		x.m.Offer(signed("dev-1", 3, v3))
		for i := 0; ; i++ {
			r, err := run(x.m, varied(i))
			if err != nil {
				t.Fatal(err)
			}
			if r.Version == "1.1.0" {
				break
			}
			if i > 5000 {
				t.Fatalf("not switched: %v", x.m.Slots()[0])
			}
		}
		ae := x.ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 3)
		if !strings.Contains(ae.GetDetail(), "after the shadow phase: shadow agreement 1.000") || ae.GetRolloutId() != "r-shadow" {
			t.Fatalf("ACTIVATED %v", ae)
		}
		// The finished phase stays reported.
		s = x.m.Slots()[0]
		if s.GetActive().GetVersion() != "1.1.0" || s.GetPending() != nil || s.GetShadow().GetCandidate().GetVersion() != "1.1.0" || s.GetShadow().GetCompared() < 20 {
			t.Fatalf("slot after the switch %v", s)
		}
	})

	t.Run("released into disagreement: refused", func(t *testing.T) {
		t.Parallel()
		x := setup(t)
		for i := range 40 {
			row := nominal
			if i%2 == 1 {
				row = dip // 1.1.0 flips these
			}
			if r, err := run(x.m, row); err != nil || r.Version != "1.0.0" {
				t.Fatalf("in shadow: %+v %v", r, err)
			}
		}
		sh := shadowState(t, x.m, 30).GetShadow()
		if a := float64(sh.GetAgreed()) / float64(sh.GetCompared()); a > 0.7 || sh.GetMaxScoreDiff() < 0.5 {
			t.Fatalf("disagreeing figures %v", sh)
		}
		v3 := with(x.v2, func(a *pb.SlotAssignment) { a.Shadow = &pb.ShadowPolicy{MinInferences: 10, MinAgreement: 0.9} })
		x.m.Offer(signed("dev-1", 3, v3))
		fe := x.ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, 3)
		if !strings.Contains(fe.GetDetail(), "shadow phase: shadow agreement 0.") {
			t.Fatalf("FAILED %v", fe)
		}
		s := x.m.Slots()[0]
		if s.GetActive().GetVersion() != "1.0.0" || s.GetPending() != nil || s.GetShadow().GetAgreed() == s.GetShadow().GetCompared() {
			t.Fatalf("slot after the refusal %v", s)
		}
	})

	t.Run("switched by a plain assignment", func(t *testing.T) {
		t.Parallel()
		x := setup(t)
		for i := range 20 {
			run(x.m, varied(i))
		}
		shadowState(t, x.m, 10)
		v3 := with(x.v2, func(a *pb.SlotAssignment) { a.Shadow = nil })
		x.m.Offer(signed("dev-1", 3, v3))
		ae := x.ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 3)
		if !strings.Contains(ae.GetDetail(), "switched by the controller after the shadow phase") {
			t.Fatalf("ACTIVATED %v", ae)
		}
		if got := fmt.Sprint(x.ev.kinds(3)); got != "[EVENT_KIND_ACTIVATED]" {
			t.Fatalf("switch events %s", got)
		}
	})

	t.Run("dropped when no longer desired", func(t *testing.T) {
		t.Parallel()
		x := setup(t)
		for i := range 20 {
			run(x.m, varied(i))
		}
		shadowState(t, x.m, 10)
		// The rollout is rolled back: the active version is desired again.
		v1 := proto.Clone(x.v2).(*pb.SlotAssignment)
		v1.Model = x.m.Slots()[0].GetActive()
		v1.Url, v1.Rollback, v1.Shadow = "/v1/artifacts/"+v1.Model.GetBundleSha256(), true, nil
		x.m.Offer(signed("dev-1", 3, v1))
		deadline := time.Now().Add(20 * time.Second)
		for x.m.candidateOf("default") != nil {
			if time.Now().After(deadline) {
				t.Fatal("candidate not dropped")
			}
			time.Sleep(5 * time.Millisecond)
		}
		s := x.m.Slots()[0]
		if s.GetActive().GetVersion() != "1.0.0" || s.GetPending() != nil || s.GetShadow().GetCandidate().GetVersion() != "1.1.0" {
			t.Fatalf("slot after the drop %v", s)
		}
		if k := fmt.Sprint(x.ev.kinds(3)); strings.Contains(k, "ACTIVATED") {
			t.Fatalf("events %s", k)
		}

		// The same version assigned again: while it converges, the old
		// figures must not pass for the new phase's.
		old := s.GetShadow().GetCompared()
		x.m.Offer(signed("dev-1", 4, x.v2))
		for x.m.candidateOf("default") == nil {
			s := x.m.Slots()[0]
			if s.GetPending() != nil && s.GetShadow() != nil && s.GetShadow().GetCompared() >= old {
				t.Fatalf("old figures reported for the new attempt: %v", s)
			}
			if time.Now().After(deadline.Add(40 * time.Second)) {
				t.Fatal("no new shadow phase")
			}
			time.Sleep(time.Millisecond)
		}
		if c := x.m.Slots()[0].GetShadow().GetCompared(); c >= old {
			t.Fatalf("the new phase starts at %d comparisons", c)
		}
	})
}

// TestUnserved: a desired slot with nothing active is converging while the
// agent still tries, failed once it gave up.
func TestUnserved(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	m, ev, _ := f.start()
	if c, fl := m.Unserved(); c != 0 || fl != 0 {
		t.Fatalf("no desired state: %d converging, %d failed", c, fl)
	}
	// A bundle that is not served: retried, converging.
	missing := &pb.SlotAssignment{Slot: "a", Model: &pb.ModelRef{Name: "grid-anomaly", Version: "1.0.0", BundleSha256: strings.Repeat("1", 64)},
		Url: "/v1/artifacts/none", Size: 10}
	// A bundle that is not a bundle: refused for good, failed.
	junk := f.publish("b", "grid-anomaly", "1.0.0", []byte("not a bundle"))
	m.Offer(signed("dev-1", 1, missing, junk))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, 1)
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, fl := m.Unserved()
		if c == 1 && fl == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d converging, %d failed; want 1 and 1: %v", c, fl, m.Slots())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
