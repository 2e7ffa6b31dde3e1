package deploy

import (
	"sort"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Op is what an Action does to a slot.
type Op int

// The operations Diff yields.
const (
	// OpInstall makes the assignment's bundle the slot's active model.
	OpInstall Op = iota + 1
	// OpRemove stops the slot's model: the desired state no longer lists it.
	OpRemove
)

func (o Op) String() string {
	switch o {
	case OpInstall:
		return "install"
	case OpRemove:
		return "remove"
	}
	return "unknown"
}

// Action is one step that brings a slot to its desired model.
type Action struct {
	Op   Op
	Slot string
	// Assign is the desired assignment (OpInstall only).
	Assign *pb.SlotAssignment
}

// Diff compares the desired slots with the running ones (slot name to the
// digest of its active bundle) and returns the actions that converge them,
// ordered by slot name. A slot whose active bundle already has the desired
// digest needs nothing. Diff is pure: it looks at nothing but its arguments.
func Diff(desired []*pb.SlotAssignment, running map[string]string) []Action {
	var out []Action
	want := map[string]bool{}
	for _, a := range desired {
		want[a.GetSlot()] = true
		if running[a.GetSlot()] != a.GetModel().GetBundleSha256() {
			out = append(out, Action{Op: OpInstall, Slot: a.GetSlot(), Assign: a})
		}
	}
	for slot := range running {
		if !want[slot] {
			out = append(out, Action{Op: OpRemove, Slot: slot})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Slot < out[j].Slot })
	return out
}
