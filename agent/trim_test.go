package agent

import (
	"context"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
)

// With Options.TrimIdle, a running agent gives memory back once after
// start-up and once after each burst of work (here a deployment change);
// without it, it never does.
func TestIdleTrim(t *testing.T) {
	broker := brokertest.Start(t)
	cfg := DefaultConfig()
	cfg.ID, cfg.Data, cfg.Broker, cfg.AllowUnsigned = dev, t.TempDir(), broker.URL(), true
	h := modeltest.NewHost(t, host.Options{})

	idle, err := New(cfg, Options{Host: h, NoListener: true, Spool: spool.NewMemory(0)})
	if err != nil {
		t.Fatal(err)
	}
	if idle.trim != nil {
		t.Fatal("an agent without TrimIdle has a trimmer")
	}

	cfg.Data = t.TempDir()
	a, err := New(cfg, Options{Host: h, NoListener: true, Spool: spool.NewMemory(0), TrimIdle: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	waitTrims := func(n uint64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for a.trim.Trims() < n {
			if time.Now().After(deadline) {
				t.Fatalf("%d trims, want %d", a.trim.Trims(), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitTrims(1) // after start-up
	before := a.trim.Trims()
	a.StateChanged()
	waitTrims(before + 1)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
