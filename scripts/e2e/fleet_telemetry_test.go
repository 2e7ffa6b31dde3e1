package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/fleet/sim"
)

// TestThousandAgentsLoseNothing: 1,000 agents (real agent code, fleet/sim)
// build up a backlog of inference records while cut off from the network,
// then all come back at once and send it as fast as their send windows
// allow, through a broker at its default settings: the controller's
// embedded one, and Mosquitto as shipped (max_queued_messages 1000 for
// the controller's session). Afterwards the controller's store holds every
// record of every agent exactly once.
func TestThousandAgentsLoseNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Run("embedded", func(t *testing.T) { thousandAgents(t, "") })
	t.Run("mosquitto", func(t *testing.T) {
		if mosquittoBinary() == "" && os.Getenv("CI") == "true" {
			t.Fatal("mosquitto is not installed; CI must run the Mosquitto variant (apt-get install -y mosquitto)")
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port(t))
		mosquittoAt(t, t.TempDir(), addr) // skips if mosquitto is not installed
		thousandAgents(t, "tcp://"+addr)
	})
}

func thousandAgents(t *testing.T, external string) {
	const (
		agents   = 1000
		perAgent = 100 // inference records each
	)
	start := time.Now()
	f := startController(t, external)
	simLog, err := os.Create(filepath.Join(f.dir, "sim.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { simLog.Close() })
	s, err := sim.New(sim.Options{Agents: agents, Broker: f.broker, Controller: f.api, Labels: simLabels(t, "fleet=sim"), Seed: 1,
		AgentLogger: slog.New(slog.NewTextHandler(simLog, &slog.HandlerOptions{Level: slog.LevelWarn})),
		MaxBackoff:  2 * time.Second, RetryMin: 200 * time.Millisecond, AllowUnsigned: true,
		// Connects spread over 10 s, and a state report every 5 s.
		// Mosquitto at its defaults sends the controller 20 messages at a
		// time and drops what queues past 1,000 more. With all 1,000
		// agents connecting within a second (hello, presence and state
		// each), one run at load 35 lost 63 hellos that way: the
		// controller only queues each message for its writers, but on
		// two loaded cores its acks came too slowly for that burst. What
		// this test loads is telemetry, which flows under the agents'
		// send windows and is resent until acked.
		StartRate: 100, StateInterval: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sim: %v", err)
		}
	})
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	if err := s.WaitJoined(wctx); err != nil {
		t.Fatal(err)
	}
	f.eventually("the controller knows every device", time.Minute, func() (bool, string) {
		n := len(f.byID("fleet=sim"))
		return n == agents, fmt.Sprintf("%d of %d devices known", n, agents)
	})
	if _, err := f.client.PushModel(ctx, compiledModel(t, "1.0.0")); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.Assign(ctx, client.Assignment{Model: "fraud-score", Version: "1.0.0", Selector: "fleet=sim"}); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, a := range s.Agents() {
		ids = append(ids, a.ID)
	}
	f.waitRunning("fraud-score@1.0.0", ids...)
	t.Logf("%d agents running the model after %s", agents, time.Since(start).Round(time.Millisecond))

	// Offline, every agent spools its records.
	for _, a := range s.Agents() {
		a.SetOnline(false)
	}
	var wg sync.WaitGroup
	var failed atomic.Int64
	work := make(chan *sim.Agent)
	for range 16 {
		wg.Go(func() {
			for a := range work {
				for range perAgent {
					if _, err := a.Infer(ctx); err != nil {
						failed.Add(1)
					}
				}
			}
		})
	}
	for _, a := range s.Agents() {
		work <- a
	}
	close(work)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d inferences failed", n)
	}
	// Back online all at once: 1,000 backlogs at full speed.
	flush := time.Now()
	for _, a := range s.Agents() {
		a.SetOnline(true)
	}
	f.eventually("every spool drained", 90*time.Second, func() (bool, string) {
		waiting := 0
		for _, a := range s.Agents() {
			if a.Stats().SpoolDepth > 0 {
				waiting++
			}
		}
		return waiting == 0, fmt.Sprintf("%d agents still have records waiting", waiting)
	})
	t.Logf("%d records sent and acked in %s", agents*perAgent, time.Since(flush).Round(time.Millisecond))

	st, err := store.OpenReadOnly(ctx, filepath.Join(f.dir, "controller", store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var total int64
	for _, a := range s.Agents() {
		got, err := st.TelemetryStats(ctx, a.ID)
		if err != nil {
			t.Fatal(err)
		}
		want := int64(a.Stats().Inferences)
		if got.Records != got.Distinct || got.Inferences != want || want < perAgent {
			t.Fatalf("%s: store holds %+v; the agent made %d inferences: want each record exactly once", a.ID, got, want)
		}
		total += got.Inferences
	}
	t.Logf("store holds all %d inference records of %d agents exactly once (%s in all)", total, agents, time.Since(start).Round(time.Millisecond))
}
