package main

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestDoMainRejectsBadInput(t *testing.T) {
	cases := []struct {
		args []string
		env  map[string]string
		code int
		want string
	}{
		{[]string{"--help"}, nil, 0, "-mqtt-listen"},
		{[]string{"--nope"}, nil, 2, "flag provided but not defined"},
		{[]string{"extra"}, nil, 2, `unexpected argument "extra"`},
		{[]string{"--http-listen", "nowhere"}, nil, 2, "--http-listen"},
		{nil, map[string]string{"EDGEFLEET_LOG_LEVEL": "chatty"}, 2, `--log-level "chatty"`},
	}
	for _, c := range cases {
		var out, errOut bytes.Buffer
		code := doMain(c.args, func(k string) string { return c.env[k] }, &out, &errOut)
		if code != c.code || !strings.Contains(errOut.String(), c.want) {
			t.Errorf("doMain(%v) = %d, stderr %q; want %d and %q", c.args, code, errOut.String(), c.code, c.want)
		}
	}
}

// TestBinary builds fleet-controller, runs it, waits for the ready line,
// checks /healthz, and stops it with SIGTERM.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "fleet-controller")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	data := t.TempDir()
	cmd := exec.Command(bin, "--http-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--log-level", "warn")
	cmd.Env = append(os.Environ(), "EDGEFLEET_DATA="+data)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		lines <- line
		io.Copy(io.Discard, stdout)
	}()
	var line string
	select {
	case line = <-lines:
	case <-time.After(20 * time.Second):
		t.Fatalf("no ready line; stderr:\n%s", stderr.String())
	}
	m := regexp.MustCompile(`^controller ready http=(127\.0\.0\.1:\d+) mqtt=(127\.0\.0\.1:\d+)\n$`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("ready line = %q", line)
	}
	resp, err := http.Get("http://" + m[1] + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok" {
		t.Fatalf("healthz = %d %q", resp.StatusCode, body)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("did not stop within 15s of SIGTERM")
	}
	if _, err := os.Stat(filepath.Join(data, "controller.db")); err != nil {
		t.Fatalf("EDGEFLEET_DATA not used: %v", err)
	}
}
