package rollout

import (
	"errors"
	"strings"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
)

func TestAgentSpec(t *testing.T) {
	cases := []struct {
		name, spec string
		err        string
	}{
		{"agent release", `{"selector":"region=eu","agent":"1.2.0"}`, ""},
		{"explicit pseudo slot", `{"selector":"","agent":"1.2.0","slot":"@agent"}`, ""},
		{"both", `{"selector":"","agent":"1.2.0","model":"m@1.0.0"}`, "not both"},
		{"bad version", `{"selector":"","agent":"1.2"}`, "agent \"1.2\""},
		{"a slot", `{"selector":"","agent":"1.2.0","slot":"default"}`, "leave slot out"},
		{"neither", `{"selector":""}`, "agent release with agent"},
		{"model into the pseudo slot", `{"selector":"","model":"m@1.0.0","slot":"@agent"}`, "slot \"@agent\""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := ParseSpec([]byte(c.spec))
			if c.err != "" {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err %v; want one naming %q", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			name, version := s.ModelRef()
			if s.Slot != release.Slot || name != release.Model || version != "1.2.0" {
				t.Fatalf("spec %+v: slot %s, target %s@%s", s, s.Slot, name, version)
			}
		})
	}
}

func TestAgentSlotObservation(t *testing.T) {
	cases := []struct {
		name    string
		st      *pb.ReportedState
		version string
		healthy bool
		pending string
	}{
		{"agent without self-update", &pb.ReportedState{AgentVersion: "0.9.0"}, "0.9.0", true, ""},
		{"new version on trial", &pb.ReportedState{AgentVersion: "1.2.0", AgentUpdate: &pb.AgentUpdateState{Running: "1.2.0", SinceUnixMs: 5}}, "1.2.0", false, ""},
		{"healthy", &pb.ReportedState{AgentVersion: "1.2.0", AgentUpdate: &pb.AgentUpdateState{Running: "1.2.0", Healthy: true}}, "1.2.0", true, ""},
		{"downloading", &pb.ReportedState{AgentVersion: "1.0.0", AgentUpdate: &pb.AgentUpdateState{Healthy: true, Pending: "1.2.0"}}, "1.0.0", true, "1.2.0"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			so, ok := agentSlot(c.st)
			if !ok || !so.activeIs(release.Digest(c.version)) || so.healthy != c.healthy {
				t.Fatalf("observed %+v; want %s healthy=%v", so, c.version, c.healthy)
			}
			if (so.pending == nil) != (c.pending == "") || (so.pending != nil && so.pending.GetVersion() != c.pending) {
				t.Fatalf("pending %v; want %q", so.pending, c.pending)
			}
			if ms := c.st.GetAgentUpdate().GetSinceUnixMs(); ms > 0 && !so.since.Equal(time.UnixMilli(ms)) {
				t.Fatalf("since %v", so.since)
			}
		})
	}
	if _, ok := agentSlot(&pb.ReportedState{}); ok {
		t.Fatal("a state without an agent version observed as running one")
	}
}
