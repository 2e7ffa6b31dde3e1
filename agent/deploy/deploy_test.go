package deploy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/durable"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

func TestDiff(t *testing.T) {
	a := func(slot, digest string) *pb.SlotAssignment {
		return &pb.SlotAssignment{Slot: slot, Model: &pb.ModelRef{Name: "m", Version: "1.0.0", BundleSha256: digest}}
	}
	cases := []struct {
		name    string
		desired []*pb.SlotAssignment
		running map[string]string
		want    string
	}{
		{"nothing", nil, nil, ""},
		{"fresh install", []*pb.SlotAssignment{a("s", "d1")}, nil, "install s d1"},
		{"up to date", []*pb.SlotAssignment{a("s", "d1")}, map[string]string{"s": "d1"}, ""},
		{"upgrade", []*pb.SlotAssignment{a("s", "d2")}, map[string]string{"s": "d1"}, "install s d2"},
		{"slot with nothing active", []*pb.SlotAssignment{a("s", "d1")}, map[string]string{"s": ""}, "install s d1"},
		{"remove", nil, map[string]string{"s": "d1"}, "remove s"},
		{"mixed, sorted by slot", []*pb.SlotAssignment{a("z", "d3"), a("b", "d1"), a("c", "d2")},
			map[string]string{"a": "d0", "b": "d1", "c": "d9"}, "remove a; install c d2; install z d3"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var parts []string
			for _, act := range Diff(c.desired, c.running) {
				s := act.Op.String() + " " + act.Slot
				if act.Op == OpInstall {
					s += " " + act.Assign.GetModel().GetBundleSha256()
				}
				parts = append(parts, s)
			}
			if got := strings.Join(parts, "; "); got != c.want {
				t.Fatalf("Diff = %q, want %q", got, c.want)
			}
		})
	}
}

func TestDecodeDesiredRefuses(t *testing.T) {
	good := func() *pb.DesiredState {
		return &pb.DesiredState{DeviceId: "dev-1", Generation: 1, Slots: []*pb.SlotAssignment{
			{Slot: "default", Model: &pb.ModelRef{Name: "m", Version: "1.0.0", BundleSha256: strings.Repeat("a", 64)}, Url: "/b"},
		}}
	}
	cases := []struct {
		name   string
		mutate func(*pb.DesiredState)
		want   string
	}{
		{"ok", func(*pb.DesiredState) {}, ""},
		{"generation 0", func(d *pb.DesiredState) { d.Generation = 0 }, "generation is 0"},
		{"bad device", func(d *pb.DesiredState) { d.DeviceId = "a/b" }, "device id"},
		{"bad digest", func(d *pb.DesiredState) { d.Slots[0].Model.BundleSha256 = "../x" }, "bundle_sha256"},
		{"bad slot", func(d *pb.DesiredState) { d.Slots[0].Slot = "" }, "name \"\""},
		{"twice", func(d *pb.DesiredState) { d.Slots = append(d.Slots, d.Slots[0]) }, "listed twice"},
		{"no url", func(d *pb.DesiredState) { d.Slots[0].Url = "" }, "no download url"},
		{"no version", func(d *pb.DesiredState) { d.Slots[0].Model.Version = "" }, "name and a version"},
		{"huge", func(d *pb.DesiredState) { d.Slots[0].Size = 1 << 40 }, "outside"},
		{"shadow ok", func(d *pb.DesiredState) {
			d.Slots[0].Shadow = &pb.ShadowPolicy{MinInferences: 10, MinAgreement: 0.98, Tolerance: 0.05, Hold: true}
		}, ""},
		{"shadow agreement > 1", func(d *pb.DesiredState) { d.Slots[0].Shadow = &pb.ShadowPolicy{MinAgreement: 98} }, "min_agreement 98 is outside 0..1"},
		{"shadow tolerance NaN", func(d *pb.DesiredState) { d.Slots[0].Shadow = &pb.ShadowPolicy{Tolerance: math.NaN()} }, "tolerance NaN"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := good()
			c.mutate(d)
			raw, _ := proto.Marshal(d)
			_, err := DecodeDesired(&pb.SignedDesiredState{Desired: raw})
			if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
				t.Fatalf("err = %v, want %q", err, c.want)
			}
		})
	}
	if _, err := DecodeDesired(&pb.SignedDesiredState{Desired: []byte{0xff, 0xff}}); err == nil {
		t.Fatal("garbage decoded")
	}
}

func FuzzDecodeDesired(f *testing.F) {
	raw, _ := proto.Marshal(&pb.DesiredState{DeviceId: "d", Generation: 3, Slots: []*pb.SlotAssignment{
		{Slot: "s", Model: &pb.ModelRef{Name: "m", Version: "1", BundleSha256: strings.Repeat("0", 64)}, Url: "u"}}})
	f.Add(raw)
	f.Add([]byte{})
	raw, _ = proto.Marshal(&pb.DesiredState{DeviceId: "d", Generation: 4, Slots: []*pb.SlotAssignment{
		{Slot: "s", Model: &pb.ModelRef{Name: "m", Version: "2", BundleSha256: strings.Repeat("1", 64)}, Url: "u",
			Shadow: &pb.ShadowPolicy{MinInferences: 50, MaxMs: 60_000, MinAgreement: 0.98, Tolerance: 0.05, Hold: true}}}})
	f.Add(raw)
	f.Fuzz(func(t *testing.T, raw []byte) {
		ds, err := DecodeDesired(&pb.SignedDesiredState{Desired: raw})
		if err == nil && (ds.GetGeneration() == 0 || len(ds.GetSlots()) > MaxSlots) {
			t.Fatalf("accepted %v", ds)
		}
		for _, s := range ds.GetSlots() {
			if p := s.GetShadow(); p != nil {
				if a := p.GetMinAgreement(); err == nil && !(a >= 0 && a <= 1) {
					t.Fatalf("accepted min_agreement %v", a)
				}
				ShadowPolicyFrom(p, nil) // must not panic
			}
		}
	})
}

func FuzzParseState(f *testing.F) {
	f.Add([]byte(`{"version":1,"slots":{"default":{"active":{"name":"m","version":"1.0.0","digest":"` + strings.Repeat("a", 64) + `"}}}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"version":1,"slots":{"s":{"active":{"name":"m","version":"2","digest":"` + strings.Repeat("b", 64) + `"},` +
		`"previous":{"name":"m","version":"1","digest":"` + strings.Repeat("a", 64) + `"},"rollout_id":"r","generation":3,` +
		`"watch":{"policy":{"watch_ms":1000,"max_error_rate":0.05,"min_inferences":20},"started_unix_ms":1,"deadline_unix_ms":2,` +
		`"restarts":1,"counts":{"inferences":9,"errors":1,"latency":[0,3,6]}},` +
		`"refused":{"name":"m","version":"3","digest":"` + strings.Repeat("c", 64) + `","generation":2,"reason":"x"}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ParseState(data)
		if err != nil {
			return
		}
		for slot, r := range st.Slots {
			if !slotRE.MatchString(slot) || r == nil {
				t.Fatalf("accepted slot %q", slot)
			}
			if w := r.Watch; w != nil && (r.Active == nil || len(w.Counts.Latency) > latencyBuckets || w.Counts.Errors > w.Counts.Inferences) {
				t.Fatalf("accepted watch %+v", w)
			}
			if w := r.Watch; w != nil {
				watchFromRecord(w).policy.Judge(w.Counts, true, w.Extended) // must not panic
			}
		}
	})
}

// events records what the manager reports.
type events struct {
	mu     sync.Mutex
	evs    []*pb.Event
	notify chan struct{}
	states atomic.Int32
}

func newEvents() *events { return &events{notify: make(chan struct{}, 1000)} }

func (e *events) Event(_ context.Context, ev *pb.Event) {
	e.mu.Lock()
	e.evs = append(e.evs, ev)
	e.mu.Unlock()
	e.notify <- struct{}{}
}

func (e *events) StateChanged() { e.states.Add(1) }

func (e *events) all() []*pb.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*pb.Event(nil), e.evs...)
}

// waitFor waits for an event of kind with generation gen.
func (e *events) waitFor(t *testing.T, kind pb.EventKind, gen uint64) *pb.Event {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		for _, ev := range e.all() {
			if ev.GetKind() == kind && ev.GetGeneration() == gen {
				return ev
			}
		}
		select {
		case <-e.notify:
		case <-deadline:
			t.Fatalf("no %s event for generation %d; got %v", kind, gen, e.all())
		}
	}
}

func (e *events) kinds(gen uint64) []pb.EventKind {
	var out []pb.EventKind
	for _, ev := range e.all() {
		if ev.GetGeneration() == gen {
			out = append(out, ev.GetKind())
		}
	}
	return out
}

// artifacts serves bundle files by path, like the controller.
type artifacts struct {
	mu    sync.Mutex
	files map[string][]byte
	paths map[string]int
	hits  atomic.Int32
}

func (a *artifacts) hitsOf(path string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.paths[path]
}

func (a *artifacts) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.hits.Add(1)
	a.mu.Lock()
	data, ok := a.files[r.URL.Path]
	if a.paths == nil {
		a.paths = map[string]int{}
	}
	a.paths[r.URL.Path]++
	a.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	http.ServeContent(w, r, "", time.Unix(0, 0), strings.NewReader(string(data)))
}

func (a *artifacts) put(path string, data []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.files == nil {
		a.files = map[string][]byte{}
	}
	a.files[path] = data
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

type fixture struct {
	t    *testing.T
	dir  string
	srv  *httptest.Server
	art  *artifacts
	host *host.Host
}

func newFixture(t *testing.T) *fixture {
	art := &artifacts{}
	srv := httptest.NewServer(art)
	t.Cleanup(srv.Close)
	// The shared compilation cache: the Go guest compiles once, ever,
	// instead of once per test (over 20s each under -race).
	h := modeltest.NewHost(t, host.Options{PoolSize: 2})
	return &fixture{t: t, dir: t.TempDir(), srv: srv, art: art, host: h}
}

// start runs a manager on the fixture's data dir until the test ends.
func (f *fixture) start() (*Manager, *events, func()) {
	f.t.Helper()
	return f.startWith(nil)
}

// startWith is start with options changed by mod.
func (f *fixture) startWith(mod func(*Options)) (*Manager, *events, func()) {
	f.t.Helper()
	ev := newEvents()
	o := Options{DeviceID: "dev-1", DataDir: f.dir, Host: f.host, Controller: f.srv.URL, Reporter: ev,
		RetryMin: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(testWriter{f.t}, nil))}
	if mod != nil {
		mod(&o)
	}
	m, err := New(o)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := m.Restore(f.t.Context()); err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := m.Run(ctx); err != nil {
			f.t.Errorf("Run: %v", err)
		}
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			<-done
			m.Close(context.Background())
		})
	}
	f.t.Cleanup(stop)
	return m, ev, stop
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	defer func() { recover() }() // a late line after the test ended
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// publish serves data and returns an assignment of it to slot.
func (f *fixture) publish(slot, name, version string, data []byte) *pb.SlotAssignment {
	d := digestOf(data)
	path := "/v1/artifacts/" + d
	f.art.put(path, data)
	return &pb.SlotAssignment{Slot: slot, Model: &pb.ModelRef{Name: name, Version: version, BundleSha256: d}, Url: path, Size: int64(len(data))}
}

func signed(id string, gen uint64, slots ...*pb.SlotAssignment) *pb.SignedDesiredState {
	raw, err := proto.Marshal(&pb.DesiredState{DeviceId: id, Generation: gen, IssuedAtUnixMs: time.Now().UnixMilli(), Slots: slots})
	if err != nil {
		panic(err)
	}
	return &pb.SignedDesiredState{Desired: raw}
}

// infer runs one inference through Acquire and returns the answering version.
func infer(t *testing.T, m *Manager, name string) (string, []float32) {
	t.Helper()
	model, release, ok := m.Acquire(name)
	if !ok {
		t.Fatalf("no active model %q", name)
	}
	defer release()
	out, err := model.Infer(t.Context(), []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 4}, []float32{230, 10, 50, 35})})
	if err != nil {
		t.Fatal(err)
	}
	v, err := out[0].Float32s()
	if err != nil {
		t.Fatal(err)
	}
	return model.Manifest().Version, v
}

func TestManagerConverges(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	v1 := f.publish("default", "grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v2 := f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0"))
	m, ev, stop := f.start()
	if m.Ready() {
		t.Fatal("ready with no model")
	}

	m.Offer(signed("dev-1", 1, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)
	if got := fmt.Sprint(ev.kinds(1)); got != "[EVENT_KIND_DOWNLOADING EVENT_KIND_VERIFIED EVENT_KIND_ACTIVATED]" {
		t.Fatalf("events for generation 1: %s", got)
	}
	if v, score := infer(t, m, "grid-anomaly"); v != "1.0.0" || len(score) != 1 {
		t.Fatalf("answered by %s: %v", v, score)
	}
	if !m.Ready() || m.Generation() != 1 {
		t.Fatalf("ready %v generation %d", m.Ready(), m.Generation())
	}

	m.Offer(signed("dev-1", 2, v2))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
		t.Fatalf("answered by %s after the upgrade", v)
	}
	slots := m.Slots()
	if len(slots) != 1 || slots[0].GetActive().GetVersion() != "1.1.0" || slots[0].GetPrevious().GetVersion() != "1.0.0" ||
		slots[0].GetActiveSinceUnixMs() == 0 || slots[0].GetPending() != nil {
		t.Fatalf("slots %v", slots)
	}
	st, err := readState(filepath.Join(f.dir, StateFile))
	if err != nil || st.Slots["default"].Active.Digest != v2.Model.BundleSha256 || st.Slots["default"].Previous.Digest != v1.Model.BundleSha256 {
		t.Fatalf("state file %+v, %v", st, err)
	}

	// A bundle whose bytes do not match the digest: FAILED, and 1.1.0 keeps answering.
	bad := proto.Clone(v1).(*pb.SlotAssignment)
	bad.Model.BundleSha256 = strings.Repeat("0", 64)
	bad.Model.Version = "1.2.0"
	bad.Url = "/v1/artifacts/bad"
	f.art.put(bad.Url, modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	third := signed("dev-1", 3, bad)
	m.Offer(third)
	fe := ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, 3)
	if !strings.Contains(fe.GetDetail(), "does not match") {
		t.Fatalf("FAILED detail %q", fe.GetDetail())
	}
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
		t.Fatalf("answered by %s after a failed deployment", v)
	}
	// It is retried with backoff (a transient failure).
	hits := f.art.hits.Load()
	deadline := time.Now().Add(10 * time.Second)
	for f.art.hits.Load() < hits+2 {
		if time.Now().After(deadline) {
			t.Fatal("failed download not retried")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := m.Slots()[0]; s.GetPending().GetVersion() != "1.2.0" || !strings.Contains(s.GetLastError(), "does not match") {
		t.Fatalf("slot while retrying: %v", s)
	}

	// Stale and foreign desired states are refused.
	m.Offer(signed("dev-1", 2, v1))
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_REFUSED, 2).GetDetail(); !strings.Contains(d, "not above the last accepted generation 3") {
		t.Fatalf("REFUSED detail %q", d)
	}
	m.Offer(signed("dev-9", 7, v1))
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_REFUSED, 7).GetDetail(); !strings.Contains(d, `for device "dev-9"`) {
		t.Fatalf("REFUSED detail %q", d)
	}
	expired := &pb.DesiredState{DeviceId: "dev-1", Generation: 9, ExpiresAtUnixMs: time.Now().Add(-time.Hour).UnixMilli(), Slots: []*pb.SlotAssignment{v1}}
	raw, _ := proto.Marshal(expired)
	m.Offer(&pb.SignedDesiredState{Desired: raw})
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_REFUSED, 9).GetDetail(); !strings.Contains(d, "expired") {
		t.Fatalf("REFUSED detail %q", d)
	}
	if m.Generation() != 3 {
		t.Fatalf("generation %d after refusals", m.Generation())
	}
	// The same desired state again (a retained redelivery) is not a replay.
	before := len(ev.all())
	m.Offer(third)
	time.Sleep(50 * time.Millisecond)
	for _, e := range ev.all()[before:] {
		if e.GetKind() == pb.EventKind_EVENT_KIND_REFUSED {
			t.Fatalf("redelivery refused: %v", e)
		}
	}

	// Roll back to 1.0.0: its bundle was kept as previous, no download.
	stop()
	v1hits := f.art.hitsOf(v1.Url)
	m, ev, _ = f.start()
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
		t.Fatalf("restored %s", v)
	}
	if m.Generation() != 3 {
		t.Fatalf("restored generation %d", m.Generation())
	}
	m.Offer(signed("dev-1", 4, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 4)
	if got := fmt.Sprint(ev.kinds(4)); got != "[EVENT_KIND_VERIFIED EVENT_KIND_ACTIVATED]" {
		t.Fatalf("rollback events %s", got)
	}
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
		t.Fatalf("after rollback answered by %s", v)
	}
	if f.art.hitsOf(v1.Url) != v1hits {
		t.Fatal("rollback downloaded the previous bundle again")
	}
	// Files nobody needs (a cut .part of the bad digest) are pruned after
	// the pass; the active and previous bundles stay.
	deadline = time.Now().Add(5 * time.Second)
	for {
		entries, _ := os.ReadDir(filepath.Join(f.dir, BundlesDir))
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		want := []string{v1.Model.BundleSha256 + ".bundle", v2.Model.BundleSha256 + ".bundle"}
		if len(names) == 2 && slices.Contains(names, want[0]) && slices.Contains(names, want[1]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bundle store holds %v, want %v", names, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestManagerRefusesBadBundles(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	good := modeltest.ExampleBundle(t, "grid-anomaly", "1.0.0")
	goodBytes, _ := good.Encode()
	v1 := f.publish("default", "grid-anomaly", "1.0.0", goodBytes)

	// Same module and version, a golden vector the module cannot reproduce.
	man := good.Manifest
	man.Tests = append([]bundle.TestVector(nil), man.Tests...)
	tv := man.Tests[0]
	tv.Outputs = []bundle.TensorValue{{Name: tv.Outputs[0].Name, Datatype: "FP32", Shape: tv.Outputs[0].Shape, Data: []float64{42}}}
	man.Tests[0] = tv
	wrongGolden, _ := modeltest.Bundle(t, man, good.Module).Encode()

	cases := []struct {
		name   string
		assign *pb.SlotAssignment
		want   string
	}{
		{"golden test fails", f.publish("default", "grid-anomaly", "1.0.0", wrongGolden), "refused"},
		{"not a bundle", f.publish("default", "grid-anomaly", "1.0.2", []byte("this is not a tar file, but its digest matches")), "invalid bundle"},
		{"names another model", f.publish("default", "other", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0")), "desired state names other"},
	}
	m, ev, _ := f.start()
	m.Offer(signed("dev-1", 1, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			gen := uint64(i + 2)
			hits := f.art.hits.Load()
			m.Offer(signed("dev-1", gen, c.assign))
			fe := ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, gen)
			if !strings.Contains(fe.GetDetail(), c.want) {
				t.Fatalf("FAILED detail %q, want %q", fe.GetDetail(), c.want)
			}
			if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
				t.Fatalf("a bad bundle replaced the running model: %s answers", v)
			}
			// Permanent: not retried.
			time.Sleep(300 * time.Millisecond)
			if n := len(ev.kinds(gen)); n > 3 {
				t.Fatalf("bad bundle retried: %v", ev.kinds(gen))
			}
			if got := f.art.hits.Load() - hits; got > 1 {
				t.Fatalf("bad bundle downloaded %d times", got)
			}
		})
	}
}

func TestSwitchWaitsForInferencesInFlight(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	v1 := f.publish("default", "grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v2 := f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0"))
	m, ev, _ := f.start()
	m.Offer(signed("dev-1", 1, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var calls, failures atomic.Int32
	var firstErr atomic.Value
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				model, release, ok := m.Acquire("grid-anomaly")
				if !ok {
					failures.Add(1)
					continue
				}
				_, err := model.Infer(ctx, []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 4}, []float32{1, 2, 3, 4})})
				release()
				calls.Add(1)
				if err != nil && !errors.Is(err, context.Canceled) {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	for gen := uint64(2); gen <= 3; gen++ {
		a := v2
		if gen%2 == 1 {
			a = v1
		}
		m.Offer(signed("dev-1", gen, a))
		ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, gen)
	}
	cancel()
	wg.Wait()
	if failures.Load() > 0 || calls.Load() == 0 {
		t.Fatalf("%d of %d calls failed across switches; first: %v", failures.Load(), calls.Load(), firstErr.Load())
	}
}

func TestRestoreFallsBackToPrevious(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	v1 := f.publish("default", "grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v2 := f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0"))
	m, ev, stop := f.start()
	m.Offer(signed("dev-1", 1, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)
	m.Offer(signed("dev-1", 2, v2))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
	stop()

	// The active bundle got damaged on disk while the agent was down.
	path := filepath.Join(f.dir, BundlesDir, v2.Model.BundleSha256+".bundle")
	if err := os.WriteFile(path, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	f.art.put(v2.Url, nil) // and the controller is unreachable for it
	m, ev, _ = f.start()
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
		t.Fatalf("serving %s, want the previous 1.0.0", v)
	}
	if errs := strings.Join(m.RecentErrors(), "\n"); !strings.Contains(errs, "serving the previous model 1.0.0") {
		t.Fatalf("recent errors: %s", errs)
	}
	// Run then tries to get the desired 1.1.0 back, and reports why it cannot.
	ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, 2)
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
		t.Fatalf("serving %s after the failed retry", v)
	}
}

// TestLoadLoopGuard: a bundle the agent died loading is retried a few
// times, then refused, so a poisonous bundle cannot crash-loop the device.
func TestLoadLoopGuard(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	v1 := f.publish("default", "grid-anomaly", "1.0.0", modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	v2 := f.publish("default", "grid-anomaly", "1.1.0", modeltest.BuildExample(t, "grid-anomaly", "1.1.0"))
	m, ev, stop := f.start()
	m.Offer(signed("dev-1", 1, v1))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)
	stop()

	// As if the agent had accepted generation 2 and died loading v2.
	die := func(attempts int) {
		raw, _ := proto.Marshal(signed("dev-1", 2, v2))
		if err := durable.WriteFile(filepath.Join(f.dir, DesiredFile), raw); err != nil {
			t.Fatal(err)
		}
		st, err := readState(filepath.Join(f.dir, StateFile))
		if err != nil {
			t.Fatal(err)
		}
		st.Loading = &LoadingRecord{Slot: "default", Digest: v2.Model.BundleSha256, Attempts: attempts}
		if err := writeState(filepath.Join(f.dir, StateFile), st); err != nil {
			t.Fatal(err)
		}
	}

	die(maxLoadAttempts)
	m, ev, stop = f.start()
	time.Sleep(300 * time.Millisecond)
	if k := ev.kinds(2); len(k) != 0 {
		t.Fatalf("a bundle the agent died loading %d times was tried again: %v", maxLoadAttempts, k)
	}
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
		t.Fatalf("serving %s", v)
	}
	if s := m.Slots()[0]; !strings.Contains(s.GetLastError(), "stopped 3 times while loading") {
		t.Fatalf("slot %v", s)
	}
	stop()
	if st, _ := readState(filepath.Join(f.dir, StateFile)); st.Loading == nil || st.Loading.Digest != v2.Model.BundleSha256 {
		t.Fatalf("the refusal did not survive in the state file: %+v", st.Loading)
	}

	die(1)
	m, ev, _ = f.start()
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 2)
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
		t.Fatalf("serving %s after a retried load", v)
	}
	if st, _ := readState(filepath.Join(f.dir, StateFile)); st.Loading != nil {
		t.Fatalf("loading record left after a good load: %+v", st.Loading)
	}
}
