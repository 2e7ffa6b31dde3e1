package layout

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/edgefleet/edgefleet/"

// deps returns every package the packages matching pattern import,
// directly or not.
func deps(t *testing.T, pattern string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-test", "-f", "{{.ImportPath}}", module+pattern).CombinedOutput()
	if err != nil {
		t.Fatalf("go list %s: %v\n%s", pattern, err, out)
	}
	return strings.Fields(string(out))
}

func TestImportRules(t *testing.T) {
	rules := []struct {
		pattern   string
		forbidden []string
		why       string
	}{
		{"agent/...", []string{"controller"}, "the agent must build and ship without the controller"},
		{"controller/...", []string{"agent"}, "the controller must not depend on agent internals"},
		{"fleet/...", []string{"controller"}, "the operator side talks to the controller only through its HTTP API"},
		{"proto/...", []string{"agent", "controller", "fleet", "models"}, "the wire contract depends on nothing of ours"},
		{"models/...", []string{"agent", "controller", "fleet"}, "models are shared by agent, controller and CLI"},
	}
	for _, r := range rules {
		t.Run(r.pattern, func(t *testing.T) {
			pkgs := deps(t, r.pattern)
			if len(pkgs) == 0 {
				t.Fatalf("go list %s found no packages", r.pattern)
			}
			for _, p := range pkgs {
				for _, f := range r.forbidden {
					if p == module+f || strings.HasPrefix(p, module+f+"/") {
						t.Errorf("%s depends on %s: %s", r.pattern, p, r.why)
					}
				}
			}
		})
	}
}
