package director

import (
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
	"google.golang.org/protobuf/proto"
)

// TestBuildAgentRelease: the pseudo slot of an agent release becomes
// DesiredState.agent_release, not a slot assignment an agent would try to
// load as a model.
func TestBuildAgentRelease(t *testing.T) {
	d := New(Options{ArtifactBaseURL: "https://ctl.example"})
	ds := &store.Desired{DeviceID: "dev-1", Generation: 5, IssuedAt: time.UnixMilli(1_700_000_000_000), Slots: []store.DesiredSlot{
		{Slot: release.Slot, Model: release.Model, Version: "1.2.0", Digest: release.Digest("1.2.0"), RolloutID: "r1", Rollback: true},
		{Slot: "default", Model: "m", Version: "1.0.0", Digest: "ab", Size: 1},
	}}
	if err := d.build(ds); err != nil {
		t.Fatal(err)
	}
	var sd pb.SignedDesiredState
	var want pb.DesiredState
	if err := proto.Unmarshal(ds.Doc, &sd); err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(sd.GetDesired(), &want); err != nil {
		t.Fatal(err)
	}
	ar := want.GetAgentRelease()
	if ar.GetVersion() != "1.2.0" || ar.GetRolloutId() != "r1" || !ar.GetRollback() || ar.GetUrl() != "https://ctl.example"+release.BasePath("1.2.0") {
		t.Fatalf("agent release %v", ar)
	}
	if len(want.GetSlots()) != 1 || want.GetSlots()[0].GetSlot() != "default" {
		t.Fatalf("slots %v; want only the model slot", want.GetSlots())
	}
}
