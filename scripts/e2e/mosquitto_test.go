package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// mosquittoBinary finds Debian's mosquitto, which lives in /usr/sbin.
func mosquittoBinary() string {
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// startMosquitto starts a private Mosquitto on a free loopback port and
// returns its URL. Outside CI a missing mosquitto skips the test loudly;
// in CI (CI=true) it fails, since .ci/run installs it.
func startMosquitto(t *testing.T) string {
	t.Helper()
	bin := mosquittoBinary()
	if bin == "" {
		msg := "mosquitto is not installed: the Mosquitto end-to-end test did NOT run (apt-get install -y mosquitto)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		fmt.Fprintln(os.Stderr, "\n!!!!! SKIPPED:", msg, "!!!!!")
		t.Skip(msg)
	}
	dir := t.TempDir()
	p := port(t)
	conf := filepath.Join(dir, "mosquitto.conf")
	// Broker defaults otherwise: the test proves the product works with
	// Mosquitto as shipped, not with a tuned one.
	cfg := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n", p)
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := proc.Start("mosquitto", filepath.Join(dir, "mosquitto.log"), bin, "-c", conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	addr := fmt.Sprintf("127.0.0.1:%d", p)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return "tcp://" + addr
		}
		if done, err := m.Exited(); done {
			b, _ := os.ReadFile(filepath.Join(dir, "mosquitto.log"))
			t.Fatalf("mosquitto exited: %v\n%s", err, b)
		}
		select {
		case <-ctx.Done():
			t.Fatal("mosquitto did not listen within 10s")
		case <-time.After(50 * time.Millisecond):
		}
	}
}
