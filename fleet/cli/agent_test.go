package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/proto/trust"
)

func TestAgentReleaseUsage(t *testing.T) {
	dir := t.TempDir()
	_, priv, _ := trust.GenerateKey()
	kb, _ := trust.MarshalPrivateKey(priv)
	key := filepath.Join(dir, "release.key")
	if err := os.WriteFile(key, kb, 0o600); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable() // an ELF binary of this machine's architecture
	if err != nil {
		t.Fatal(err)
	}
	other := "arm64"
	if runtime.GOARCH == "arm64" {
		other = "amd64"
	}
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no verb", []string{"agent"}, 2, "release push"},
		{"unknown verb", []string{"agent", "release", "frob"}, 2, "unknown verb"},
		{"no binary", []string{"agent", "release", "push", "--version", "1.0.0", "--key", key}, 2, "want one BINARY"},
		{"no version", []string{"agent", "release", "push", self, "--key", key}, 2, "--version and --key"},
		{"bad version", []string{"agent", "release", "push", self, "--version", "1.0", "--key", key}, 1, "MAJOR.MINOR.PATCH"},
		{"rollout with a model too", []string{"rollout", "create", "m@1.0.0", "--agent-release", "1.0.0", "-l", ""}, 2, "no MODEL@VERSION"},
	}
	if runtime.GOOS == "linux" {
		cases = append(cases, struct {
			name string
			args []string
			code int
			want string
		}{"wrong architecture", []string{"agent", "release", "push", self, "--version", "1.0.0", "--key", key, "--arch", other}, 1, "pass --arch " + runtime.GOARCH})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := run(t, c.args...)
			if code != c.code || !strings.Contains(stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, stderr, c.code, c.want)
			}
		})
	}
}

func TestWithAgent(t *testing.T) {
	spec, err := specFromFlags("", "region=eu", "n", "", "1,100%", "1m", "", "", 0, "", "", "", "", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	out, err := withAgent(spec, "1.2.0")
	if err != nil {
		t.Fatal(err)
	}
	var s client.RolloutSpec
	if err := json.Unmarshal(out, &s); err != nil {
		t.Fatal(err)
	}
	if s.Agent != "1.2.0" || s.Model != "" || s.Slot != "" || s.Selector != "region=eu" || len(s.Strategy.Waves) != 2 {
		t.Fatalf("spec %+v", s)
	}
}
