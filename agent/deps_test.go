package agent

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies guards the design's dependency rule: the agent never
// imports the controller or the operator side, only proto/ and models/.
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/edgefleet/edgefleet/agent/...").CombinedOutput()
	if err != nil {
		t.Skipf("go list unavailable: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/edgefleet/edgefleet/controller", "github.com/edgefleet/edgefleet/fleet"} {
			if p == banned || strings.HasPrefix(p, banned+"/") {
				t.Errorf("the agent depends on %s; move what it needs to proto/ or models/", p)
			}
		}
	}
}
