package controller

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies guards the architecture: the controller never imports
// the agent or the operator side; it shares only proto/ and models/.
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/edgefleet/edgefleet/controller/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/edgefleet/edgefleet/agent", "github.com/edgefleet/edgefleet/fleet"} {
			if pkg == banned || strings.HasPrefix(pkg, banned+"/") {
				t.Errorf("the controller depends on %s", pkg)
			}
		}
	}
}
