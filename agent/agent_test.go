package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

const dev = "edge-1"

// bundles serves bundle files content-addressed, like the controller's
// artifact store, with Range support.
type bundles struct {
	mu    sync.Mutex
	files map[string][]byte
}

func (b *bundles) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	data, ok := b.files[r.URL.Path]
	b.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	http.ServeContent(w, r, "", time.Unix(0, 0), strings.NewReader(string(data)))
}

// add serves data and returns the slot assignment for it.
func (b *bundles) add(name, version string, data []byte) *pb.SlotAssignment {
	sum := sha256.Sum256(data)
	d := hex.EncodeToString(sum[:])
	path := "/v1/artifacts/" + d
	b.mu.Lock()
	if b.files == nil {
		b.files = map[string][]byte{}
	}
	b.files[path] = data
	b.mu.Unlock()
	return &pb.SlotAssignment{Slot: "default", Model: &pb.ModelRef{Name: name, Version: version, BundleSha256: d}, Url: path, Size: int64(len(data)), RolloutId: "r-1"}
}

func desired(gen uint64, slots ...*pb.SlotAssignment) *pb.SignedDesiredState {
	raw, err := proto.Marshal(&pb.DesiredState{DeviceId: dev, Generation: gen, IssuedAtUnixMs: time.Now().UnixMilli(), Slots: slots})
	if err != nil {
		panic(err)
	}
	return &pb.SignedDesiredState{Desired: raw, KeyId: "test"}
}

type runningAgent struct {
	addr string
	stop func()
}

// startAgent runs the agent in-process with test timings until stop.
func startAgent(t *testing.T, cfg Config, h *host.Host, sp Spool) *runningAgent {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, cfg, Options{
			Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Host:   h, Listener: ln, Ready: func(a string) { ready <- a },
			MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
			RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond,
			AckTimeout: 2 * time.Second, StateInterval: 100 * time.Millisecond,
			Spool: sp,
		})
	}()
	var a runningAgent
	select {
	case a.addr = <-ready:
	case err := <-done:
		t.Fatalf("agent stopped before ready: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("agent not ready")
	}
	var once sync.Once
	a.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Error("agent did not stop")
			}
		})
	}
	t.Cleanup(a.stop)
	return &a
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	defer func() { recover() }() // a late line after the test ended
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

type inferResult struct {
	Code         int
	ModelVersion string `json:"model_version"`
	Error        string `json:"error"`
	Outputs      []struct {
		Data []float64 `json:"data"`
	} `json:"outputs"`
}

func infer(t *testing.T, addr string) inferResult {
	t.Helper()
	body := `{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[230,10,50,35]}]}`
	resp, err := http.Post("http://"+addr+"/v2/models/grid-anomaly/infer", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r inferResult
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("infer answer %q: %v", b, err)
	}
	r.Code = resp.StatusCode
	return r
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func event(kind pb.EventKind, gen uint64) func(brokertest.Message) bool {
	return func(m brokertest.Message) bool {
		e := m.Env.GetEvent()
		return e != nil && e.GetKind() == kind && e.GetGeneration() == gen
	}
}

func state(cond func(*pb.ReportedState) bool) func(brokertest.Message) bool {
	return func(m brokertest.Message) bool {
		s := m.Env.GetState()
		return s != nil && m.Topic == wire.Topic(dev, wire.KindState) && cond(s)
	}
}

// autoAck acknowledges every telemetry batch the controller receives,
// as the controller's ingest does after storing it.
func autoAck(ctx context.Context, ctl *brokertest.Controller) {
	acked := 0
	for ctx.Err() == nil {
		msgs := ctl.Messages()
		var batches []*pb.TelemetryBatch
		for _, m := range msgs {
			if b := m.Env.GetTelemetry(); b != nil {
				batches = append(batches, b)
			}
		}
		for _, b := range batches[acked:] {
			var ranges []*pb.SeqRange
			for _, r := range b.GetRecords() {
				ranges = append(ranges, &pb.SeqRange{First: r.GetSeq(), Last: r.GetSeq()})
			}
			ctl.Send(dev, wire.KindAck, &pb.TelemetryAck{SpoolEpoch: b.GetSpoolEpoch(), Stored: ranges})
		}
		acked = len(batches)
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAgentEndToEnd(t *testing.T) {
	broker := brokertest.Start(t)
	ctl := broker.Controller(t)
	art := &bundles{}
	srv := httptest.NewServer(art)
	defer srv.Close()
	v1 := art.add("grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	h := modeltest.NewHost(t, host.Options{PoolSize: 2})
	data := t.TempDir()
	cfg := DefaultConfig()
	cfg.ID, cfg.Data, cfg.Broker, cfg.Controller = dev, data, broker.URL(), srv.URL
	cfg.Labels = map[string]string{"region": "eu"}
	cfg.AllowUnsigned = true // the test's desired states are unsigned

	a := startAgent(t, cfg, h, nil)
	if code, _ := get(t, "http://"+a.addr+"/v2/health/ready"); code != 503 {
		t.Fatalf("ready = %d with no model", code)
	}
	hello := ctl.WaitFor(10*time.Second, "hello", brokertest.Kind(dev, wire.KindHello)).Env.GetHello()
	if hello.GetLabels()["region"] != "eu" || hello.GetAgentVersion() != Version || len(hello.GetAbiVersions()) != 1 || hello.GetAbiVersions()[0] != 1 ||
		hello.GetOs() == "" || hello.GetState() == nil {
		t.Fatalf("hello %v", hello)
	}
	ctl.WaitFor(10*time.Second, "presence online", func(m brokertest.Message) bool { return m.Env.GetPresence().GetOnline() })

	// Generation 1: download, verify, activate, report, serve.
	ctl.Send(dev, wire.KindDesired, desired(1, v1))
	for _, k := range []pb.EventKind{pb.EventKind_EVENT_KIND_DOWNLOADING, pb.EventKind_EVENT_KIND_VERIFIED, pb.EventKind_EVENT_KIND_ACTIVATED} {
		e := ctl.WaitFor(30*time.Second, k.String(), event(k, 1)).Env.GetEvent()
		if e.GetSlot() != "default" || e.GetModel().GetVersion() != "1.0.0" || e.GetRolloutId() != "r-1" {
			t.Fatalf("event %v", e)
		}
	}
	st := ctl.WaitFor(10*time.Second, "state with 1.0.0 active", state(func(s *pb.ReportedState) bool {
		return len(s.GetSlots()) == 1 && s.GetSlots()[0].GetActive().GetVersion() == "1.0.0"
	})).Env.GetState()
	if st.GetDesiredGeneration() != 1 || st.GetHealth() != pb.Health_HEALTH_OK || st.GetAgentVersion() != Version {
		t.Fatalf("state %v", st)
	}
	r := infer(t, a.addr)
	if r.Code != 200 || r.ModelVersion != "1.0.0" || len(r.Outputs) != 1 {
		t.Fatalf("infer %+v", r)
	}
	code, md := get(t, "http://"+a.addr+"/v2/models/grid-anomaly")
	if code != 200 || !strings.Contains(md, `"platform":"edgefleet-wasm"`) || !strings.Contains(md, `"versions":["1.0.0"]`) {
		t.Fatalf("metadata %d %s", code, md)
	}

	// Telemetry: inference outcomes reach the controller in batches; its
	// acks empty the spool.
	for range 20 {
		if r := infer(t, a.addr); r.Code != 200 {
			t.Fatalf("infer %+v", r)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { autoAck(ctx, ctl) })
	seen := map[uint64]bool{}
	ctl.WaitFor(20*time.Second, "21 inference records", func(m brokertest.Message) bool {
		for _, rec := range m.Env.GetTelemetry().GetRecords() {
			if inf := rec.GetInference(); inf != nil && inf.GetModel() == "grid-anomaly" && inf.GetVersion() == "1.0.0" {
				seen[rec.GetSeq()] = true
			}
		}
		return len(seen) >= 21
	})
	ctl.WaitFor(20*time.Second, "spool depth 0 reported", state(func(s *pb.ReportedState) bool {
		return s.GetSpoolDepth() == 0 && len(seen) >= 21
	}))
	waitMetric(t, a.addr, "edgefleet_agent_spool_depth 0")
	waitMetric(t, a.addr, "edgefleet_agent_telemetry_acked_total 2") // 21 or more

	// Generation 2 with a bundle whose bytes do not match: FAILED, 1.0.0 keeps answering.
	bad := proto.Clone(v1).(*pb.SlotAssignment)
	bad.Model.Version, bad.Model.BundleSha256 = "1.1.0", strings.Repeat("0", 64)
	ctl.Send(dev, wire.KindDesired, desired(2, bad))
	fe := ctl.WaitFor(30*time.Second, "FAILED", event(pb.EventKind_EVENT_KIND_FAILED, 2)).Env.GetEvent()
	if !strings.Contains(fe.GetDetail(), "does not match its digest") {
		t.Fatalf("FAILED detail %q", fe.GetDetail())
	}
	if r := infer(t, a.addr); r.Code != 200 || r.ModelVersion != "1.0.0" {
		t.Fatalf("after a failed deployment: %+v", r)
	}
	ctl.WaitFor(10*time.Second, "degraded state", state(func(s *pb.ReportedState) bool {
		return s.GetHealth() == pb.Health_HEALTH_DEGRADED && len(s.GetSlots()) > 0 && s.GetSlots()[0].GetPending().GetVersion() == "1.1.0" && s.GetDesiredGeneration() == 2
	}))

	// A stale generation is refused.
	ctl.Send(dev, wire.KindDesired, desired(1, v1))
	if d := ctl.WaitFor(10*time.Second, "REFUSED", event(pb.EventKind_EVENT_KIND_REFUSED, 1)).Env.GetEvent().GetDetail(); !strings.Contains(d, "not above") {
		t.Fatalf("REFUSED detail %q", d)
	}

	// Malformed payloads on every topic the agent reads: dropped, agent fine.
	for _, k := range []wire.Kind{wire.KindDesired, wire.KindAck, wire.KindCmd} {
		ctl.SendRaw(wire.Topic(dev, k), []byte("\x08\x96\x01 garbage"), false)
	}
	waitMetric(t, a.addr, "edgefleet_agent_mqtt_malformed_total 3")
	before := ctl.Count(brokertest.Kind(dev, wire.KindHello))
	ctl.Send(dev, wire.KindCmd, &pb.Command{Id: "c1", Name: "resync"})
	ctl.WaitFor(10*time.Second, "hello after resync", func(brokertest.Message) bool {
		return ctl.Count(brokertest.Kind(dev, wire.KindHello)) > before
	})
	if r := infer(t, a.addr); r.Code != 200 {
		t.Fatalf("after malformed messages: %+v", r)
	}
	cancel()
	wg.Wait()

	// A clean stop says offline.
	offBefore := ctl.Count(func(m brokertest.Message) bool { return m.Env.GetPresence() != nil && !m.Env.GetPresence().GetOnline() })
	a.stop()
	ctl.WaitFor(10*time.Second, "presence offline", func(brokertest.Message) bool {
		return ctl.Count(func(m brokertest.Message) bool { return m.Env.GetPresence() != nil && !m.Env.GetPresence().GetOnline() }) > offBefore
	})

	// Restart on the same data dir with no broker and no controller
	// reachable: the last good model is served before any connection.
	broker.Close()
	srv.Close()
	cfg.Broker = "tcp://" + brokertest.FreeAddr(t)
	// (With an in-memory spool, as the fleet simulator runs agents.)
	mem := spool.NewMemory(0)
	a = startAgent(t, cfg, h, mem)
	if code, _ := get(t, "http://"+a.addr+"/v2/health/ready"); code != 200 {
		t.Fatalf("ready = %d after restart", code)
	}
	if r := infer(t, a.addr); r.Code != 200 || r.ModelVersion != "1.0.0" {
		t.Fatalf("after restart offline: %+v", r)
	}
	// The outcome waits in the spool for the controller, and so do the
	// events of the retried deployment, which could not be published.
	deadline := time.Now().Add(10 * time.Second)
	for {
		recs, _ := mem.Read(t.Context(), 0, math.MaxUint64, 1000)
		var inferences, failed int
		for _, r := range recs {
			if r.GetInference().GetVersion() == "1.0.0" {
				inferences++
			}
			if r.GetEvent().GetKind() == pb.EventKind_EVENT_KIND_FAILED && r.GetEvent().GetGeneration() == 2 {
				failed++
			}
		}
		if inferences == 1 && failed > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spooled %d inferences and %d FAILED events: %v", inferences, failed, recs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitMetric polls /metrics until a line starts with want (a prefix, so
// "x 2" also matches "x 21").
func waitMetric(t *testing.T, addr, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, body := get(t, "http://"+addr+"/metrics")
		for _, line := range strings.Split(body, "\n") {
			if strings.HasPrefix(line, want) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never had %q:\n%s", want, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRunRefusesBadConfig(t *testing.T) {
	cfg := DefaultConfig()
	cfg.ID = "bad id"
	if err := Run(t.Context(), cfg, Options{}); err == nil || !strings.Contains(err.Error(), "id:") {
		t.Fatalf("Run with a bad id: %v", err)
	}
	cfg = DefaultConfig()
	cfg.ID, cfg.Data = "x", t.TempDir()
	if err := Run(t.Context(), cfg, Options{}); !errors.Is(err, ErrNoKeys) || !strings.Contains(err.Error(), "--release-key") || !strings.Contains(err.Error(), "--allow-unsigned") {
		t.Fatalf("Run without keys: %v", err)
	}
	cfg.AllowUnsigned = true
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg.Listen = ln.Addr().String()
	if err := Run(t.Context(), cfg, Options{Host: modeltest.NewHost(t, host.Options{})}); err == nil || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("Run on a taken port: %v", err)
	}
}

func ExampleDeviceIDFromHostname() {
	fmt.Println(DeviceIDFromHostname("Till 3 (front).shop"))
	// Output: Till-3--front-.shop
}
