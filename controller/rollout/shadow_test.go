package rollout_test

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// shadowFleet is a fleet (fleet_test.go) on the real clock, whose devices
// report shadow phases.
type shadowFleet struct {
	*fleet
}

func startShadowFleet(t *testing.T, devices int) *shadowFleet {
	t.Helper()
	f := &shadowFleet{newFleet(t, devices, time.Now)}
	for _, id := range f.ids {
		f.report(id, 0, f.v1, nil, nil)
	}
	f.start(rollout.Options{GateInterval: 20 * time.Millisecond, MaxSleep: 20 * time.Millisecond})
	return f
}

// report stores what device id reports, as the inventory does, and tells
// the engine.
func (f *shadowFleet) report(id string, gen uint64, active store.Model, pending *pb.ModelRef, shadow *pb.ShadowState) {
	f.t.Helper()
	s := &pb.SlotState{Slot: "default", Active: ref(active), Healthy: true, Pending: pending, Shadow: shadow, ActiveSinceUnixMs: time.Now().UnixMilli()}
	if err := f.inv.State(f.t.Context(), id, time.Now(), &pb.ReportedState{Slots: []*pb.SlotState{s}, DesiredGeneration: gen, Health: pb.Health_HEALTH_OK}); err != nil {
		f.t.Fatal(err)
	}
	f.changed(id)
}

// shadowing reports every device in shadow of 2.0.0 with compared
// comparisons, agreed of them agreeing.
func (f *shadowFleet) shadowing(compared, agreed uint64) {
	f.t.Helper()
	for _, id := range f.ids {
		d := f.desired(id)
		f.report(id, d.gen, f.v1, ref(f.v2), &pb.ShadowState{Candidate: ref(f.v2), Compared: compared, Agreed: agreed, SinceUnixMs: time.Now().UnixMilli()})
	}
}

type desiredSlot struct {
	gen  uint64
	slot *pb.SlotAssignment
}

// desired decodes the signed document the store holds for id: what the
// device is sent.
func (f *shadowFleet) desired(id string) desiredSlot {
	f.t.Helper()
	d, err := f.st.DesiredState(f.t.Context(), id)
	if err != nil {
		return desiredSlot{}
	}
	var sd pb.SignedDesiredState
	var ds pb.DesiredState
	if err := proto.Unmarshal(d.Doc, &sd); err != nil {
		f.t.Fatal(err)
	}
	if err := proto.Unmarshal(sd.GetDesired(), &ds); err != nil {
		f.t.Fatal(err)
	}
	if len(ds.GetSlots()) != 1 {
		return desiredSlot{gen: d.Generation}
	}
	return desiredSlot{gen: d.Generation, slot: ds.GetSlots()[0]}
}

// waitDesired waits until every device is sent what ok accepts.
func (f *shadowFleet) waitDesired(what string, ok func(desiredSlot) bool) {
	f.t.Helper()
	f.wait(what, func() (bool, string) {
		for _, id := range f.ids {
			if d := f.desired(id); !ok(d) {
				return false, fmt.Sprintf("%s: generation %d %v", id, d.gen, d.slot)
			}
		}
		return true, ""
	})
}

func (f *shadowFleet) waitPhase(id string, p rollout.Phase) rollout.Status {
	f.t.Helper()
	var s rollout.Status
	f.wait("phase "+string(p), func() (bool, string) {
		s = f.status(id)
		return s.Phase == p, fmt.Sprintf("%s %q steps %v", s.Phase, s.Reason, s.Steps)
	})
	return s
}

// create starts the shadow-gated rollout of 2.0.0 with the devices'
// deadline.
func (f *shadowFleet) create(deadline string) string {
	f.t.Helper()
	return f.fleet.create(`{"selector":"fleet=t","model":"m@2.0.0","strategy":{"waves":["100%"],"soak":"50ms","deadline":"` + deadline + `",
		"gates":[{"type":"shadowAgreement","min":0.9,"minInferences":40,"tolerance":0.1}]}}`)
}

func held(d desiredSlot) bool {
	sh := d.slot.GetShadow()
	return d.slot.GetModel().GetVersion() == "2.0.0" && sh.GetHold() && sh.GetMinAgreement() == 0.9 && sh.GetTolerance() == 0.1 &&
		sh.GetMinInferences() == 10 // 40 comparisons over 4 devices
}

func shadowVerdict(s rollout.Status) rollout.Verdict {
	for _, w := range s.Waves {
		for _, v := range w.Verdicts {
			if v.Gate == rollout.GateShadowAgreement {
				return v
			}
		}
	}
	return rollout.Verdict{}
}

// TestShadowGatePasses: the wave runs in shadow, held, until the devices
// report enough agreeing comparisons together; then it switches, and the
// rollout completes as any other.
func TestShadowGatePasses(t *testing.T) {
	t.Parallel()
	f := startShadowFleet(t, 4)
	id := f.create("30m")
	f.waitDesired("held shadow policies", held)

	// 4 x 5 = 20 comparisons: under the gate's 40, nothing switches.
	f.shadowing(5, 5)
	f.wait("an inconclusive verdict", func() (bool, string) {
		v := shadowVerdict(f.status(id))
		return v.Result == rollout.Inconclusive && strings.Contains(v.Detail, "20 shadow comparisons; need 40"), v.Detail
	})
	for _, dev := range f.ids {
		if d := f.desired(dev); !held(d) {
			t.Fatalf("%s switched on too few comparisons: %v", dev, d.slot)
		}
	}
	if s := f.status(id); s.Phase != rollout.PhaseRunning {
		t.Fatalf("rollout %s %q", s.Phase, s.Reason)
	}

	// 4 x 10 = 40, all agreeing: the switch (only once the last device
	// reported: 25, 30, 35 are short of 40).
	f.shadowing(10, 10)
	f.waitDesired("the switch", func(d desiredSlot) bool {
		return d.slot.GetModel().GetVersion() == "2.0.0" && d.slot.GetShadow() == nil && d.slot.GetHealth().GetWatchMs() == 50
	})
	v := shadowVerdict(f.status(id))
	if v.Result != rollout.Pass || !strings.Contains(v.Detail, "agreement 100.00% in 40 comparisons") {
		t.Fatalf("verdict %+v", v)
	}
	for _, dev := range f.ids {
		f.report(dev, f.desired(dev).gen, f.v2, nil, &pb.ShadowState{Candidate: ref(f.v2), Compared: 40, Agreed: 40})
	}
	s := f.waitPhase(id, rollout.PhaseSucceeded)
	if s.Steps[rollout.StepHealthy] != 4 {
		t.Fatalf("steps %v", s.Steps)
	}
	// The final judgement keeps the recorded pass: the devices no longer
	// report a shadow phase under way.
	if v := shadowVerdict(s); v.Result != rollout.Pass {
		t.Fatalf("final verdict %+v", v)
	}
}

// TestShadowGateFails: agreement under the floor fails the wave; every
// device is sent its old version back and none was ever switched.
func TestShadowGateFails(t *testing.T) {
	t.Parallel()
	f := startShadowFleet(t, 4)
	id := f.create("30m")
	f.waitDesired("held shadow policies", held)
	f.shadowing(20, 10)
	f.waitDesired("the rollback", func(d desiredSlot) bool {
		return d.slot.GetModel().GetVersion() == "1.0.0" && d.slot.GetRollback() && d.slot.GetShadow() == nil
	})
	s := f.status(id)
	// The gate judges as soon as the comparisons reported reach its 40.
	if s.Phase != rollout.PhaseRollingBack || !regexp.MustCompile(`^gate failed in wave 1: shadowAgreement \(agreement 50.00% in (40|60|80) comparisons is below the floor 90.00%\)$`).MatchString(s.Reason) {
		t.Fatalf("rollout %s %q", s.Phase, s.Reason)
	}
	hist, err := f.st.RolloutHistory(t.Context(), id, 100)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(fmt.Sprint(hist), "switching") {
		t.Fatalf("a switch was issued: %v", hist)
	}
	for _, dev := range f.ids {
		f.report(dev, f.desired(dev).gen, f.v1, nil, &pb.ShadowState{Candidate: ref(f.v2), Compared: 20, Agreed: 10})
	}
	f.waitPhase(id, rollout.PhaseRolledBack)
}

// TestShadowGateUndecided: devices in shadow do not time out while the
// gate lacks comparisons; at their deadline the rollout pauses, and
// resume switches the wave anyway.
func TestShadowGateUndecided(t *testing.T) {
	t.Parallel()
	f := startShadowFleet(t, 4)
	// The deadline runs from the notification; the reports below come
	// well within it, even on a machine at load 30 (3 s was not).
	id := f.create("10s")
	f.waitDesired("held shadow policies", held)
	f.shadowing(2, 2)
	s := f.waitPhase(id, rollout.PhasePaused)
	if !strings.Contains(s.Reason, "shadow phase of wave 1 undecided at a device's deadline") || !strings.Contains(s.Reason, "8 shadow comparisons; need 40") {
		t.Fatalf("pause reason %q", s.Reason)
	}
	if s.Steps[rollout.StepTimedOut] != 0 || s.Failures != 0 {
		t.Fatalf("devices in shadow timed out: %v", s.Steps)
	}
	if err := f.e.Act(t.Context(), id, rollout.ActionResume); err != nil {
		t.Fatal(err)
	}
	f.waitDesired("the switch", func(d desiredSlot) bool {
		return d.slot.GetModel().GetVersion() == "2.0.0" && d.slot.GetShadow() == nil
	})
	for _, dev := range f.ids {
		f.report(dev, f.desired(dev).gen, f.v2, nil, nil)
	}
	f.waitPhase(id, rollout.PhaseSucceeded)
}

func TestShadowGateSpec(t *testing.T) {
	for _, c := range []struct {
		gate, err string
	}{
		{`{"type":"shadowAgreement","min":0.98,"minInferences":200,"tolerance":0.05}`, ""},
		{`{"type":"shadowAgreement","min":0.98}`, ""},
		{`{"type":"shadowAgreement","min":0.98,"tolerance":-1}`, "tolerance -1"},
		{`{"type":"shadowAgreement","min":1.5}`, "agreement floor"},
		{`{"type":"shadowAgreement"}`, "agreement floor"},
	} {
		s, err := rollout.ParseSpec([]byte(`{"selector":"a=b","model":"m@2","strategy":{"gates":[` + c.gate + `]}}`))
		if c.err == "" {
			if err != nil || s.Strategy.Waves[0].Gates[0].MinInferences == 0 {
				t.Errorf("%s: %v %+v", c.gate, err, s.Strategy.Waves[0].Gates)
			}
		} else if err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: error %v, want %q", c.gate, err, c.err)
		}
	}
}
