package main

import (
	"bytes"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent"
)

// syncBuffer is a bytes.Buffer safe to read while the agent writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func noEnv(string) string { return "" }

func TestDoMainExitCodes(t *testing.T) {
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"help", []string{"-h"}, 0, "-broker"},
		{"version", []string{"--version"}, 0, agent.Version},
		{"bad flag", []string{"--nope"}, 2, "flag provided but not defined"},
		{"bad config", []string{"--broker", "nonsense"}, 2, "broker:"},
		{"no keys", []string{"--data", t.TempDir(), "--id", "k"}, 2, "--allow-unsigned"},
		{"no director key", []string{"--data", t.TempDir(), "--id", "k", "--release-key", "r.pub"}, 2, "no director key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var stderr syncBuffer
			if code := doMain(t.Context(), c.args, noEnv, &stderr); code != c.code || !strings.Contains(stderr.String(), c.want) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, stderr.String(), c.code, c.want)
			}
		})
	}
}

// TestDoMainRunsAndStops starts the real agent with no broker around,
// waits for its ready line, and stops it the way SIGTERM does (the
// context main derives from the signal ends).
func TestDoMainRunsAndStops(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	deadBroker, _ := net.Listen("tcp", "127.0.0.1:0")
	brokerAddr := deadBroker.Addr().String()
	deadBroker.Close()

	ctx, cancel := context.WithCancel(t.Context())
	var stderr syncBuffer
	done := make(chan int)
	go func() {
		done <- doMain(ctx, []string{"--data", t.TempDir(), "--listen", addr, "--id", "cmd-test", "--broker", "tcp://" + brokerAddr, "--allow-unsigned"}, noEnv, &stderr)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(stderr.String(), `msg="agent ready" id=cmd-test listen=`+addr) {
		if time.Now().After(deadline) {
			t.Fatalf("no ready line:\n%s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d after stop:\n%s", code, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop")
	}
}
