package agent

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func TestHealthAndShadowConfig(t *testing.T) {
	file := writeFile(t, `
id: dev-7
health:
  watch: 90s
  max_error_rate: 0.02
  max_latency_p99: 250ms
  min_inferences: 50
shadow:
  min_inferences: 300
  max_duration: 15m
  min_agreement: 0.99
`)
	cfg, err := LoadConfig([]string{"--config", file}, env(nil), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	want := deploy.HealthPolicy{Watch: 90 * time.Second, MaxErrorRate: 0.02, MaxLatencyP99: 250 * time.Millisecond, MinInferences: 50}
	if got := cfg.Health.policy(); got != want {
		t.Fatalf("health policy %+v, want %+v", got, want)
	}
	if cfg.Shadow.hook() != nil {
		t.Fatal("shadow phase without shadow.enabled or --shadow")
	}
	for _, c := range []struct {
		args []string
		env  map[string]string
		on   bool
	}{
		{[]string{"--config", file, "--shadow"}, nil, true},
		{[]string{"--config", file}, map[string]string{"EDGEFLEET_SHADOW": "1"}, true},
		{[]string{"--config", file, "--shadow=false"}, map[string]string{"EDGEFLEET_SHADOW": "1"}, false},
	} {
		cfg, err := LoadConfig(c.args, env(c.env), &bytes.Buffer{})
		if err != nil {
			t.Fatal(err)
		}
		hook := cfg.Shadow.hook()
		if (hook != nil) != c.on {
			t.Fatalf("%v %v: shadow on = %v", c.args, c.env, hook != nil)
		}
		if hook != nil {
			p := hook(&pb.SlotAssignment{})
			if p.MinInferences != 300 || p.MaxDuration != 15*time.Minute || p.MinAgreement != 0.99 {
				t.Fatalf("shadow policy %+v", p)
			}
		}
	}

	for _, bad := range []struct{ yaml, want string }{
		{"health:\n  max_error_rate: 5\n", "max_error_rate 5 is outside 0..1"},
		{"shadow:\n  min_agreement: 1.5\n", "min_agreement 1.5 is outside 0..1"},
		{"health:\n  watch: soon\n", "health"},
		{"shadow:\n  enabled: true\n  typo: 1\n", "typo"},
	} {
		_, err := LoadConfig([]string{"--config", writeFile(t, "id: x\n"+bad.yaml)}, env(nil), &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("config %q: err %v, want %q", bad.yaml, err, bad.want)
		}
	}
	if _, err := LoadConfig(nil, env(map[string]string{"EDGEFLEET_SHADOW": "maybe"}), &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "EDGEFLEET_SHADOW") {
		t.Fatalf("EDGEFLEET_SHADOW=maybe: %v", err)
	}
}
