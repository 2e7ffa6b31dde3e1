package agent

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/models/examples/testmodels"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// TestRolloutSteps: the controller sees every step with its rollout id,
// HEALTHY and healthy=true only after the watch, and a version that
// breaks its bounds rolled back with the figures.
func TestRolloutSteps(t *testing.T) {
	broker := brokertest.Start(t)
	ctl := broker.Controller(t)
	art := &bundles{}
	srv := httptest.NewServer(art)
	defer srv.Close()
	v1 := art.add("grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v1.Health = &pb.HealthPolicy{WatchMs: 300, MinInferences: 3}
	flaky := art.add("grid-anomaly", testmodels.Flaky, modeltest.BuildExample(t, "grid-anomaly", testmodels.Flaky))
	flaky.RolloutId = "r-2"
	flaky.Health = &pb.HealthPolicy{WatchMs: 60_000, MaxErrorRate: 0.05, MinInferences: 20}
	cfg := DefaultConfig()
	cfg.ID, cfg.Data, cfg.Broker, cfg.Controller = dev, t.TempDir(), broker.URL(), srv.URL
	cfg.AllowUnsigned = true // the test's desired states are unsigned
	a := startAgent(t, cfg, modeltest.NewHost(t, host.Options{PoolSize: 2}), nil)
	ctl.WaitFor(10*time.Second, "hello", brokertest.Kind(dev, wire.KindHello))

	ctl.Send(dev, wire.KindDesired, desired(1, v1))
	ctl.WaitFor(30*time.Second, "ACTIVATED", event(pb.EventKind_EVENT_KIND_ACTIVATED, 1))
	activated := time.Now()
	ctl.WaitFor(10*time.Second, "state: 1.0.0 active, not healthy yet", state(func(s *pb.ReportedState) bool {
		return slot0(s).GetActive().GetVersion() == "1.0.0" && !slot0(s).GetHealthy() && slot0(s).GetRolloutId() == "r-1"
	}))
	for i := range 5 {
		if r := inferRow(t, a.addr, i); r.Code != 200 {
			t.Fatalf("infer %+v", r)
		}
	}
	he := ctl.WaitFor(10*time.Second, "HEALTHY", event(pb.EventKind_EVENT_KIND_HEALTHY, 1)).Env.GetEvent()
	if time.Since(activated) < 250*time.Millisecond || !strings.Contains(he.GetDetail(), "over 5 inferences") {
		t.Fatalf("HEALTHY %v after %s", he, time.Since(activated))
	}
	ctl.WaitFor(10*time.Second, "state: healthy", state(func(s *pb.ReportedState) bool {
		return slot0(s).GetHealthy() && slot0(s).GetRolloutId() == "r-1"
	}))
	for _, k := range []pb.EventKind{pb.EventKind_EVENT_KIND_DOWNLOADING, pb.EventKind_EVENT_KIND_VERIFIED, pb.EventKind_EVENT_KIND_ACTIVATED, pb.EventKind_EVENT_KIND_HEALTHY} {
		if e := ctl.WaitFor(time.Second, k.String(), event(k, 1)).Env.GetEvent(); e.GetRolloutId() != "r-1" {
			t.Fatalf("%s without the rollout id: %v", k, e)
		}
	}

	ctl.Send(dev, wire.KindDesired, desired(2, flaky))
	ctl.WaitFor(30*time.Second, "ACTIVATED flaky", event(pb.EventKind_EVENT_KIND_ACTIVATED, 2))
	for i := 0; ; i++ {
		r := inferRow(t, a.addr, i)
		if r.ModelVersion == "1.0.0" {
			break
		}
		if i > 2000 {
			t.Fatal("no rollback")
		}
	}
	rb := ctl.WaitFor(10*time.Second, "ROLLED_BACK", event(pb.EventKind_EVENT_KIND_ROLLED_BACK, 2)).Env.GetEvent()
	if rb.GetRolloutId() != "r-2" || rb.GetModel().GetVersion() != testmodels.Flaky || !strings.Contains(rb.GetDetail(), "error rate") ||
		!strings.Contains(rb.GetDetail(), "rolled back to 1.0.0") {
		t.Fatalf("ROLLED_BACK %v", rb)
	}
	ctl.WaitFor(10*time.Second, "state: back on 1.0.0", state(func(s *pb.ReportedState) bool {
		sl := slot0(s)
		return sl.GetActive().GetVersion() == "1.0.0" && sl.GetHealthy() && sl.GetRolloutId() == "r-1" && sl.GetPending() == nil &&
			strings.Contains(sl.GetLastError(), "rolled back") && s.GetDesiredGeneration() == 2
	}))
	waitMetric(t, a.addr, `edgefleet_agent_slot_healthy{slot="default",version="1.0.0"} 1`)
}

// inferRow posts one distinct nominal reading (the i-th).
func inferRow(t *testing.T, addr string, i int) inferResult {
	t.Helper()
	body := fmt.Sprintf(`{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[%g,%g,%g,35]}]}`,
		225+float64(i%97)*0.1, 10+float64(i%13)*0.1, 50+float64(i%7)*0.01)
	resp, err := http.Post("http://"+addr+"/v2/models/grid-anomaly/infer", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r inferResult
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	r.Code = resp.StatusCode
	return r
}

// slot0 is the reported state's first slot (an empty one if none).
func slot0(s *pb.ReportedState) *pb.SlotState {
	if len(s.GetSlots()) == 0 {
		return &pb.SlotState{}
	}
	return s.GetSlots()[0]
}
