package inventory

import (
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

func TestNames(t *testing.T) {
	kinds := map[pb.EventKind]string{
		pb.EventKind_EVENT_KIND_UNSPECIFIED: "unknown",
		pb.EventKind_EVENT_KIND_DOWNLOADING: "downloading",
		pb.EventKind_EVENT_KIND_ROLLED_BACK: "rolled-back",
		pb.EventKind_EVENT_KIND_REFUSED:     "refused",
		pb.EventKind(99):                    "unknown",
	}
	for k, want := range kinds {
		if got := EventKindName(k); got != want {
			t.Errorf("EventKindName(%v) = %q, want %q", k, got, want)
		}
	}
	health := map[pb.Health]string{
		pb.Health_HEALTH_UNSPECIFIED: store.HealthUnknown,
		pb.Health_HEALTH_OK:          store.HealthOK,
		pb.Health_HEALTH_DEGRADED:    store.HealthDegraded,
		pb.Health_HEALTH_FAILING:     store.HealthFailing,
		pb.Health(42):                store.HealthUnknown,
	}
	for h, want := range health {
		if got := HealthName(h); got != want {
			t.Errorf("HealthName(%v) = %q, want %q", h, got, want)
		}
	}
}

func TestReportAndEventFrom(t *testing.T) {
	st := &pb.ReportedState{Health: pb.Health_HEALTH_FAILING, DesiredGeneration: 9, SpoolDepth: 3, AgentVersion: "2.0.0",
		Slots: []*pb.SlotState{{Slot: "default", LastError: "oom"}}}
	r, err := ReportFrom(st)
	if err != nil {
		t.Fatal(err)
	}
	var back pb.ReportedState
	if err := proto.Unmarshal(r.State, &back); err != nil || !proto.Equal(&back, st) {
		t.Fatalf("stored state does not round-trip: %v %v", &back, err)
	}
	if r.Health != store.HealthFailing || r.ReportedGeneration != 9 || r.SpoolDepth != 3 || r.AgentVersion != "2.0.0" {
		t.Fatalf("report = %+v", r)
	}

	now := time.Unix(1000, 0)
	e := EventFrom("d", &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Slot: "s", Model: &pb.ModelRef{Name: "m", Version: "1.0.0"}, Detail: "x", Generation: 4, RolloutId: "r"}, now)
	if e.DeviceID != "d" || e.Kind != "failed" || e.Model != "m" || e.Version != "1.0.0" || e.Generation != 4 || e.RolloutID != "r" || !e.At.Equal(now) {
		t.Fatalf("event = %+v", e)
	}
	if e := EventFrom("d", &pb.Event{AtUnixMs: 5000}, now); !e.At.Equal(time.UnixMilli(5000)) {
		t.Fatalf("event time = %v", e.At)
	}
}
