package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// gridScore is grid-anomaly's formula (models/examples/grid-anomaly/README.md)
// with each version's calibration, computed natively: the answers the
// agent serves must come wholly from one version's formula.
func gridScore(version string, r [4]float64) float64 {
	scaleHz, mid := 0.5, 1.0
	if version == "1.1.0" {
		scaleHz, mid = 0.2, 0.8
	}
	zv := (r[0] - 230) / 23
	za := math.Max(0, r[1]-16) / 4
	zf := (r[2] - 50) / scaleHz
	zt := math.Max(0, r[3]-40) / 15
	d := math.Sqrt(zv*zv + za*za + zf*zf + zt*zt)
	return 1 / (1 + math.Exp(-4*(d-mid)))
}

// TestSwapUnderLoad: four clients call the local endpoint without pause
// while the controller swaps 1.0.0 -> 1.1.0 -> 1.0.0 fifty times. No
// request fails, and every answer is wholly one version's.
func TestSwapUnderLoad(t *testing.T) {
	broker := brokertest.Start(t)
	ctl := broker.Controller(t)
	art := &bundles{}
	srv := httptest.NewServer(art)
	defer srv.Close()
	v1 := art.add("grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v2 := art.add("grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0"))
	h := modeltest.NewHost(t, host.Options{PoolSize: 2})
	cfg := DefaultConfig()
	cfg.ID, cfg.Data, cfg.Broker, cfg.Controller = dev, t.TempDir(), broker.URL(), srv.URL
	cfg.AllowUnsigned = true // the test's desired states are unsigned
	a := startAgent(t, cfg, h, spool.NewMemory(0))
	ctl.WaitFor(10*time.Second, "hello", brokertest.Kind(dev, wire.KindHello))
	ctl.Send(dev, wire.KindDesired, desired(1, v1))
	ctl.WaitFor(30*time.Second, "1.0.0 activated", event(pb.EventKind_EVENT_KIND_ACTIVATED, 1))

	// Rows both calibrations score differently.
	rows := [][4]float64{{230, 10, 50, 35}, {230, 10, 49.7, 35}, {207, 18, 49.9, 42}, {253, 20, 50.3, 55}}
	var data []float64
	for _, r := range rows {
		data = append(data, r[:]...)
	}
	body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "readings", "shape": []int{len(rows), 4}, "datatype": "FP32", "data": data}}})
	for i, r := range rows {
		if math.Abs(gridScore("1.0.0", r)-gridScore("1.1.0", r)) < 1e-3 {
			t.Fatalf("row %d scores alike under both versions: the test could not tell them apart", i)
		}
	}

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var mu sync.Mutex
	byVersion := map[string]int{}
	var failures []string
	client := &http.Client{Timeout: 10 * time.Second}
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				resp, err := client.Post("http://"+a.addr+"/v2/models/grid-anomaly/infer", "application/json", bytes.NewReader(body))
				if err != nil {
					mu.Lock()
					failures = append(failures, err.Error())
					mu.Unlock()
					continue
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var r inferResult
				err = json.Unmarshal(raw, &r)
				why := ""
				switch {
				case err != nil || resp.StatusCode != 200:
					why = fmt.Sprintf("%d %s", resp.StatusCode, raw)
				case len(r.Outputs) != 1 || len(r.Outputs[0].Data) != len(rows):
					why = fmt.Sprintf("outputs %s", raw)
				default:
					for i, row := range rows {
						if want := gridScore(r.ModelVersion, row); math.Abs(r.Outputs[0].Data[i]-want) > 1e-5 {
							why = fmt.Sprintf("answer labelled %s has score %v for row %d; that version's formula gives %v", r.ModelVersion, r.Outputs[0].Data[i], i, want)
						}
					}
				}
				mu.Lock()
				byVersion[r.ModelVersion]++
				if why != "" {
					failures = append(failures, why)
				}
				mu.Unlock()
			}
		})
	}
	start := time.Now()
	gen := uint64(1)
	for range 50 {
		for _, v := range []*pb.SlotAssignment{v2, v1} {
			gen++
			ctl.Send(dev, wire.KindDesired, desired(gen, v))
			ctl.WaitFor(30*time.Second, fmt.Sprintf("ACTIVATED for generation %d", gen), event(pb.EventKind_EVENT_KIND_ACTIVATED, gen))
		}
	}
	took := time.Since(start)
	cancel()
	wg.Wait()
	t.Logf("100 swaps in %s; answers by version %v", took, byVersion)
	if len(failures) > 0 {
		t.Fatalf("%d failed or mixed answers (of %d); first: %v", len(failures), byVersion["1.0.0"]+byVersion["1.1.0"], failures[:min(3, len(failures))])
	}
	if byVersion["1.0.0"] == 0 || byVersion["1.1.0"] == 0 || len(byVersion) != 2 {
		t.Fatalf("answers by version %v", byVersion)
	}
}

// countingLoader is what the fleet simulator does: one loader for many
// agents, sharing a loaded model per bundle digest.
type countingLoader struct {
	h      *host.Host
	mu     sync.Mutex
	loads  map[string]int
	shared map[string]*sharedModel
}

type sharedModel struct {
	deploy.Model
	l      *countingLoader
	digest string
	refs   int
}

func (c *countingLoader) Load(ctx context.Context, b *bundle.Bundle) (deploy.Model, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.shared[b.Digest]; s != nil {
		s.refs++
		return s, nil
	}
	m, err := c.h.Load(ctx, b)
	if err != nil {
		return nil, err
	}
	c.loads[b.Digest]++
	s := &sharedModel{Model: m, l: c, digest: b.Digest, refs: 1}
	c.shared[b.Digest] = s
	return s, nil
}

func (s *sharedModel) Close(ctx context.Context) error {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	s.refs--
	if s.refs > 0 {
		return nil
	}
	delete(s.l.shared, s.digest)
	return s.Model.Close(ctx)
}

// TestEmbedded runs agents the way the fleet simulator does: no local
// listener, one shared Loader, in-memory spools, inference in-process.
func TestEmbedded(t *testing.T) {
	broker := brokertest.Start(t)
	ctl := broker.Controller(t)
	art := &bundles{}
	srv := httptest.NewServer(art)
	defer srv.Close()
	v1 := art.add("grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	loader := &countingLoader{h: modeltest.NewHost(t, host.Options{PoolSize: 2}), loads: map[string]int{}, shared: map[string]*sharedModel{}}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))

	ids := []string{"sim-1", "sim-2", "sim-3"}
	agents := map[string]*Agent{}
	spools := map[string]*spool.Memory{}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var ready atomic.Int32
	for _, id := range ids {
		cfg := DefaultConfig()
		cfg.ID, cfg.Data, cfg.Broker, cfg.Controller = id, t.TempDir(), broker.URL(), srv.URL
		cfg.AllowUnsigned = true // the test's desired states are unsigned
		spools[id] = spool.NewMemory(0)
		a, err := New(cfg, Options{Logger: log, Loader: loader, Spool: spools[id], NoListener: true,
			MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, StateInterval: 100 * time.Millisecond,
			Ready: func(addr string) {
				if addr != "" {
					t.Errorf("Ready(%q) without a listener", addr)
				}
				ready.Add(1)
			}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.Infer(ctx, "grid-anomaly", nil); err == nil {
			t.Fatal("Infer before Run answered")
		}
		agents[id] = a
		wg.Go(func() {
			if err := a.Run(ctx); err != nil {
				t.Errorf("%s: Run: %v", id, err)
			}
		})
	}
	defer func() {
		cancel()
		wg.Wait()
	}()
	for _, id := range ids {
		ctl.WaitFor(10*time.Second, id+" hello", brokertest.Kind(id, wire.KindHello))
		raw, err := proto.Marshal(&pb.DesiredState{DeviceId: id, Generation: 1, Slots: []*pb.SlotAssignment{v1}})
		if err != nil {
			t.Fatal(err)
		}
		ctl.Send(id, wire.KindDesired, &pb.SignedDesiredState{Desired: raw})
	}
	for _, id := range ids {
		ctl.WaitFor(30*time.Second, id+" activated", func(m brokertest.Message) bool {
			return m.Topic == wire.Topic(id, wire.KindEvents) && m.Env.GetEvent().GetKind() == pb.EventKind_EVENT_KIND_ACTIVATED
		})
	}
	if int(ready.Load()) != len(ids) {
		t.Fatalf("Ready called %d times", ready.Load())
	}
	in := []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 4}, []float32{230, 10, 49.7, 35})}
	for _, id := range ids {
		a := agents[id]
		res, err := a.Infer(ctx, "grid-anomaly", in)
		if err != nil || res.Version != "1.0.0" || res.Slot != "default" || len(res.Outputs) != 1 {
			t.Fatalf("%s: Infer %+v %v", id, res, err)
		}
		got, _ := res.Outputs[0].Float32s()
		if want := gridScore("1.0.0", [4]float64{230, 10, 49.7, 35}); math.Abs(float64(got[0])-want) > 1e-5 {
			t.Fatalf("%s: score %v, want %v", id, got, want)
		}
		if _, err := a.Infer(ctx, "nope", in); !errors.Is(err, deploy.ErrNoModel) {
			t.Fatalf("%s: unknown model: %v", id, err)
		}
		// The handler works in-process too.
		rec := httptest.NewRecorder()
		a.Handler().ServeHTTP(rec, httptest.NewRequest("POST", "/v2/models/grid-anomaly/infer",
			strings.NewReader(`{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[230,10,50,35]}]}`)))
		if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"model_version":"1.0.0"`) {
			t.Fatalf("%s: handler %d %s", id, rec.Code, rec.Body.String())
		}
		if s := a.Slots(); len(s) != 1 || s[0].GetActive().GetVersion() != "1.0.0" || a.Generation() != 1 || a.ID() != id {
			t.Fatalf("%s: slots %v", id, s)
		}
	}
	// One load for the three agents.
	loader.mu.Lock()
	loads := loader.loads[v1.Model.BundleSha256]
	refs := loader.shared[v1.Model.BundleSha256].refs
	loader.mu.Unlock()
	if loads != 1 || refs != len(ids) {
		t.Fatalf("bundle loaded %d times, %d references; want 1 and %d", loads, refs, len(ids))
	}
	// Both in-process calls were recorded for telemetry.
	for _, id := range ids {
		deadline := time.Now().Add(10 * time.Second)
		for {
			recs, _ := spools[id].Read(ctx, 0, math.MaxUint64, 100)
			n := 0
			for _, r := range recs {
				if r.GetInference().GetVersion() == "1.0.0" {
					n++
				}
			}
			if n >= 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: spool holds %v", id, recs)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	cancel()
	wg.Wait()
	loader.mu.Lock()
	defer loader.mu.Unlock()
	if len(loader.shared) != 0 {
		t.Fatalf("models not closed after the agents stopped: %v", loader.shared)
	}
}
