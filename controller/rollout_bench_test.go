package controller

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// benchFleet is a controller (embedded broker, SQLite on disk) with n
// devices in its inventory, all running m@1.0.0, and models 1.0.0 and
// 2.0.0 stored.
type benchFleet struct {
	c       *Controller
	mqtt    string
	digests map[string]string
	sizes   map[string]int64
	ids     []string
}

func startBenchFleet(b *testing.B, n int) *benchFleet {
	b.Helper()
	ctx := context.Background()
	cfg := DefaultConfig()
	cfg.DataDir = b.TempDir()
	cfg.MQTTListen = "127.0.0.1:0"
	cfg.HTTPListen = "127.0.0.1:0"
	cfg.rolloutTuning = &rollout.Options{GateInterval: time.Hour}
	c, err := New(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		b.Fatal(err)
	}
	b.Cleanup(func() { cancel(); <-done })
	f := &benchFleet{c: c, mqtt: "tcp://" + c.MQTTAddr(), digests: map[string]string{}, sizes: map[string]int64{}}
	for _, v := range []string{"1.0.0", "2.0.0"} {
		spec := []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 3}}}
		bd, err := bundle.New(bundle.Manifest{ABI: 1, Name: "m", Version: v, Inputs: spec, Outputs: spec}, []byte("module "+v))
		if err != nil {
			b.Fatal(err)
		}
		data, err := bd.Encode()
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := c.store.PutModel(ctx, store.Model{Name: "m", Version: v, Digest: bd.Digest, Size: int64(len(data)), Manifest: bd.ManifestJSON}); err != nil {
			b.Fatal(err)
		}
		f.digests[v], f.sizes[v] = bd.Digest, int64(len(data))
	}
	var hellos []store.Hello
	for i := range n {
		id := fmt.Sprintf("dev-%05d", i)
		f.ids = append(f.ids, id)
		rep := f.report(id, "1.0.0", 0)
		hellos = append(hellos, store.Hello{ID: id, Labels: map[string]string{"fleet": "bench", "site": "s" + strconv.Itoa(i%20)}, At: time.Now(), Report: &rep})
	}
	if err := c.store.UpsertHellos(ctx, hellos); err != nil {
		b.Fatal(err)
	}
	return f
}

// report is the state of a device running version, healthy.
func (f *benchFleet) report(id, version string, gen uint64) store.Report {
	st := &pb.ReportedState{DesiredGeneration: gen, Health: pb.Health_HEALTH_OK, Slots: []*pb.SlotState{{
		Slot: "default", Active: &pb.ModelRef{Name: "m", Version: version, BundleSha256: f.digests[version]},
		Healthy: true, ActiveSinceUnixMs: time.Now().Add(-time.Second).UnixMilli(),
	}}}
	b, _ := proto.Marshal(st)
	return store.Report{State: b, Health: store.HealthOK, ReportedGeneration: gen}
}

func (f *benchFleet) published() uint64 {
	return f.c.metrics.Counter("edgefleet_controller_desired_published_total", "").Value()
}

// waitStatus polls the rollout until cond holds.
func (f *benchFleet) waitStatus(b *testing.B, id string, what string, cond func(rollout.Status) bool) rollout.Status {
	b.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		s, err := f.c.rollouts.Status(context.Background(), id)
		if err != nil {
			b.Fatal(err)
		}
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			b.Fatalf("rollout %s: not %s: %+v", id, what, s)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkRolloutWaveDecision10k measures, on 10,000 devices, the time
// from the device report that completes a wave (a real MQTT state message
// through the embedded broker) to the broker's acknowledgement of the
// first desired state of the next wave (ms/decision: the decision is
// stored and acted on), and of every one (ms/dispatch-wave-N-to-M: the
// whole wave notified, over commits of rollout.Options.NotifyBatch
// devices). Waves 1%, 10%, 50%, 100%: the transitions notify 900, 4,000
// and 5,000 devices. Each iteration is one rollout (alternating between
// versions); the figures are medians over the iterations (and, for
// ms/decision, over the transitions).
func BenchmarkRolloutWaveDecision10k(b *testing.B) {
	const n = 10_000
	f := startBenchFleet(b, n)
	ctx := context.Background()
	versions := []string{"1.0.0", "2.0.0"}
	var byTransition [3][]time.Duration
	var all, cpu []time.Duration
	gen := uint64(1 << 20)
	b.ResetTimer()
	b.StopTimer()
	for i := range b.N {
		to := versions[(i+1)%2]
		id := fmt.Sprintf("bench-%d", i)
		spec, err := rollout.ParseSpec(fmt.Appendf(nil, `{"name":%q,"selector":"fleet=bench","model":"m@%s",
			"strategy":{"waves":["1%%","10%%","50%%","100%%"],"soak":"0s","deadline":"1h","failureBudget":"1%%"}}`, id, to))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.c.rollouts.Create(ctx, spec); err != nil {
			b.Fatal(err)
		}
		steps, err := f.c.rollouts.Devices(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		waves := map[int][]string{}
		for _, d := range steps {
			waves[d.Wave] = append(waves[d.Wave], d.Device)
		}
		for w := range 4 {
			devs := waves[w]
			last := devs[len(devs)-1]
			gen++
			var reps []store.DeviceReport
			for _, id := range devs[:len(devs)-1] {
				reps = append(reps, store.DeviceReport{ID: id, At: time.Now(), Report: f.report(id, to, gen)})
			}
			if err := f.c.store.UpdateReports(ctx, reps); err != nil {
				b.Fatal(err)
			}
			for _, id := range devs[:len(devs)-1] {
				f.c.rollouts.DeviceChanged(id)
			}
			healthyBefore := 0
			for k := range w {
				healthyBefore += len(waves[k])
			}
			f.waitStatus(b, id, "wave almost healthy", func(s rollout.Status) bool {
				return s.Steps[rollout.StepHealthy] == healthyBefore+len(devs)-1
			})
			if w == 3 {
				f.c.store.UpdateReports(ctx, []store.DeviceReport{{ID: last, At: time.Now(), Report: f.report(last, to, gen)}})
				f.c.rollouts.DeviceChanged(last)
				f.waitStatus(b, id, "succeeded", func(s rollout.Status) bool { return s.Phase == rollout.PhaseSucceeded })
				break
			}
			// The last report comes over MQTT, as from the device.
			dev := testdevice.Connect(b, f.mqtt, last)
			st := &pb.ReportedState{DesiredGeneration: gen, Health: pb.Health_HEALTH_OK, Slots: []*pb.SlotState{{
				Slot: "default", Active: &pb.ModelRef{Name: "m", Version: to, BundleSha256: f.digests[to]}, Healthy: true,
				ActiveSinceUnixMs: time.Now().Add(-time.Second).UnixMilli(),
			}}}
			payload, err := wire.Seal(last, time.Now(), st)
			if err != nil {
				b.Fatal(err)
			}
			base := f.published()
			want := base + uint64(len(waves[w+1]))
			cpu0 := cpuTime()
			b.StartTimer()
			start := time.Now()
			dev.SendRaw(wire.Topic(last, wire.KindState), payload, true)
			var decided time.Duration
			for n := f.published(); n < want; n = f.published() {
				if decided == 0 && n > base {
					decided = time.Since(start)
				}
				time.Sleep(200 * time.Microsecond)
			}
			took := time.Since(start)
			if decided == 0 {
				decided = took
			}
			b.StopTimer()
			cpu = append(cpu, cpuTime()-cpu0)
			byTransition[w] = append(byTransition[w], took)
			all = append(all, decided)
		}
	}
	for w, ds := range byTransition {
		b.ReportMetric(median(ds), fmt.Sprintf("ms/dispatch-wave-%d-to-%d", w+1, w+2))
	}
	b.ReportMetric(median(all), "ms/decision")
	b.ReportMetric(median(cpu), "cpu-ms/dispatch")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkRolloutPlan10k measures creating a rollout over 10,000 devices,
// stratified by site: selecting the targets, planning the waves, committing
// the plan and issuing the first wave's desired states.
func BenchmarkRolloutPlan10k(b *testing.B) {
	f := startBenchFleet(b, 10_000)
	ctx := context.Background()
	var ds []time.Duration
	for i := range b.N {
		id := fmt.Sprintf("plan-%d", i)
		spec, err := rollout.ParseSpec(fmt.Appendf(nil, `{"name":%q,"selector":"fleet=bench","model":"m@2.0.0",
			"strategy":{"waves":["1%%","10%%","50%%","100%%"],"stratifyBy":"site","soak":"1h"}}`, id))
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		if _, err := f.c.rollouts.Create(ctx, spec); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
		b.StopTimer()
		if err := f.c.rollouts.Act(ctx, id, rollout.ActionAbort); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(median(ds), "ms/create")
}

// cpuTime is the CPU time the process has used: on a shared machine it
// tells the work done from the waiting for a core.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(ds []time.Duration) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[len(s)/2]) / float64(time.Millisecond)
}
