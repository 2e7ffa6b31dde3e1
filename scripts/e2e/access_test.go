package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/modeltest"
)

// fleetAs runs the real fleet binary with token and returns its exit
// code, stdout and stderr.
func (f *fleet) fleetAs(token string, args ...string) (int, string, string) {
	f.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "fleet"), args...)
	cmd.Env = append(os.Environ(), "EDGEFLEET_CONTROLLER="+f.api, "EDGEFLEET_TOKEN="+token)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		f.t.Fatal(err)
	}
	return code, stdout.String(), stderr.String()
}

// TestOperatorTokens drives tokens and the audit log through the real CLI
// and controller processes: the admin token from DATA/admin.token makes a
// viewer and an operator token; the viewer cannot push, the operator can,
// and `fleet audit` shows who did what.
func TestOperatorTokens(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	// Not parallel: on two cores, more agent processes at once push the
	// timing-sensitive simulator and rollout tests past their deadlines.
	f := startController(t, "")
	info, err := os.Stat(filepath.Join(f.dir, "controller", "admin.token"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("admin.token: %v, mode %v; want 0600", err, info.Mode())
	}
	code, viewer, stderr := f.fleetAs(f.token, "token", "create", "--name", "maint", "--role", "viewer")
	if code != 0 || !strings.HasPrefix(viewer, "eft_") {
		t.Fatalf("token create viewer: exit %d %q %s", code, viewer, stderr)
	}
	_, operator, _ := f.fleetAs(f.token, "token", "create", "--name", "ci", "--role", "operator")
	viewer, operator = strings.TrimSpace(viewer), strings.TrimSpace(operator)

	bundle := filepath.Join(f.dir, "grid-anomaly-1.0.0.bundle")
	if err := os.WriteFile(bundle, modeltest.BuildExample(t, "grid-anomaly", "1.0.0"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := f.fleetAs("", "model", "push", bundle); code != 1 || !strings.Contains(stderr, "401") {
		t.Fatalf("push without a token: exit %d %s", code, stderr)
	}
	if code, _, stderr := f.fleetAs(viewer, "model", "push", bundle); code != 1 || !strings.Contains(stderr, `token "maint" has role viewer`) {
		t.Fatalf("push with the viewer token: exit %d %s", code, stderr)
	}
	if code, _, stderr := f.fleetAs(viewer, "devices"); code != 0 {
		t.Fatalf("devices with the viewer token: exit %d %s", code, stderr)
	}
	if code, out, stderr := f.fleetAs(operator, "model", "push", bundle); code != 0 || !strings.Contains(out, "pushed grid-anomaly@1.0.0") {
		t.Fatalf("push with the operator token: exit %d %s %s", code, out, stderr)
	}
	if code, _, stderr := f.fleetAs(operator, "token", "list"); code != 1 || !strings.Contains(stderr, "403") {
		t.Fatalf("token list with the operator token: exit %d %s", code, stderr)
	}

	code, out, stderr := f.fleetAs(viewer, "audit", "-o", "json")
	if code != 0 {
		t.Fatalf("audit: exit %d %s", code, stderr)
	}
	var audit struct {
		Entries []struct {
			Who, Role, Action, Target, Result string
			At                                string
		}
	}
	if err := json.Unmarshal([]byte(out), &audit); err != nil {
		t.Fatalf("audit -o json: %v\n%s", err, out)
	}
	var pushed, denied bool
	for _, e := range audit.Entries {
		if e.Who == "ci" && e.Role == "operator" && e.Action == "POST /v1/models" && e.Result == "ok" && strings.Contains(e.Target, "grid-anomaly@1.0.0") && e.At != "" {
			pushed = true
		}
		if e.Who == "maint" && e.Role == "viewer" && strings.HasPrefix(e.Result, "denied") {
			denied = true
		}
	}
	if !pushed || !denied {
		t.Fatalf("audit log lacks the operator's push (%v) or the viewer's refusal (%v):\n%s", pushed, denied, out)
	}
	if _, table, _ := f.fleetAs(viewer, "audit", "--who", "ci"); !strings.Contains(table, "POST /v1/models") || strings.Contains(table, "maint") {
		t.Fatalf("fleet audit --who ci:\n%s", table)
	}
}
