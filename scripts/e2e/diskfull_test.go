package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/fleet/client"
)

// TestTelemetryDiskFull runs an agent whose spool file is capped at 256 KiB
// (spool.MinMaxBytes, --spool-max-bytes: SQLite's max_page_count, which
// fails a write exactly as a full disk does) while it is cut off from the
// controller, and drives far more inferences through it than the file
// holds. The agent must keep answering every call, make room by the drop
// policy (per-inference records before the aggregates that fold them,
// events never while anything else is left), keep the file under its cap,
// and report the drops by class to the controller once it is back.
func TestTelemetryDiskFull(t *testing.T) {
	if testing.Short() {
		t.Skip("fills a capped spool while the agent is offline")
	}
	const (
		id      = "tel-disk-1"
		offline = 7000
	)
	capBytes := uint64(spool.MinMaxBytes)
	f := startController(t, "")
	cut := startCutter(t, f.broker)
	cfg := telemetryAgentConfig(t, f)
	f.agentFlags = func(id string) []string {
		return append(cfg(id), "--broker", cut.URL(), "--spool-max-bytes", strconv.FormatUint(capBytes, 10), "--aggregate-interval", "1s")
	}
	f.startAgent(id, "suite=telemetry")
	f.pushExample("1.0.0")
	if _, err := f.client.Assign(context.Background(), client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "suite=telemetry"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", id)
	f.infer(id, 1)
	time.Sleep(2500 * time.Millisecond) // the health watch ends while online
	f.waitDrained(id, 30*time.Second)

	// Offline, the spool file fills up; every call is still answered.
	cut.Cut()
	p := newProducer(f.listens[id], offline)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	p.run(ctx, 4)
	cancel()
	if p.answered.Load() < offline || p.attempted.Load() != p.answered.Load() {
		t.Fatalf("offline with a full spool the agent answered %d of %d calls (%d attempted); want every one",
			p.answered.Load(), offline, p.attempted.Load())
	}
	// Past the last aggregate interval, so it is spooled too.
	time.Sleep(1500 * time.Millisecond)
	fi, err := os.Stat(filepath.Join(f.dir, id, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	if uint64(fi.Size()) > capBytes {
		t.Fatalf("spool file is %d bytes, over its %d byte cap", fi.Size(), capBytes)
	}
	dropped, err := f.agentGauge(id, "edgefleet_agent_spool_dropped_total")
	if err != nil || dropped == 0 {
		t.Fatalf("spool dropped %v records (%v); %d calls should not fit %d bytes", dropped, err, offline, capBytes)
	}

	cut.Restore()
	var by map[string]uint64
	f.eventually("drops by class reported to the controller", 60*time.Second, func() (bool, string) {
		st, err := f.reportedState(id)
		if err != nil {
			return false, err.Error()
		}
		by = st.GetSpoolDroppedByClass()
		return by["inference"] > 0 && st.GetSpoolDropped() >= uint64(dropped), fmt.Sprintf("spool_dropped %d, by class %v", st.GetSpoolDropped(), by)
	})
	f.waitDrained(id, 60*time.Second)
	if err := f.agents[id].Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	sp := f.spoolStats(id)
	st, err := f.reportedState(id)
	if err != nil {
		t.Fatal(err)
	}
	by = st.GetSpoolDroppedByClass()
	// The policy: only per-inference records went; aggregates and events
	// (the minutes' summaries and the rollout's steps) all survived.
	if sp.DroppedInference == 0 || sp.DroppedAggregate != 0 || sp.DroppedEvent != 0 || sp.Dropped != sp.DroppedInference+sp.DroppedRaw {
		t.Fatalf("spool drops %+v: want inference records only", sp)
	}
	if by["inference"] != sp.DroppedInference || by["aggregate"] != 0 || by["event"] != 0 || st.GetSpoolDropped() != sp.Dropped {
		t.Fatalf("controller has spool_dropped %d by class %v; the spool dropped %+v", st.GetSpoolDropped(), by, sp)
	}
	t.Logf("%d calls answered offline into a %d byte spool: %d inference records dropped, no aggregate, no event", offline, capBytes, sp.DroppedInference)
}
