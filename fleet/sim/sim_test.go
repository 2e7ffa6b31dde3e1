package sim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"google.golang.org/protobuf/proto"
)

// startBroker runs a real mochi broker in the test process.
func startBroker(t testing.TB) string {
	t.Helper()
	caps := mochi.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = 256 // mochi's default costs 64 KiB a client
	srv := mochi.New(&mochi.Options{Capabilities: caps, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	if err := srv.AddListener(l); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return "tcp://" + l.Address()
}

// director plays the controller's part over MQTT (desired states out;
// hello, state, presence, events and telemetry in) and serves bundles
// over HTTP, content-addressed, as the controller's artifact store does.
type director struct {
	t   testing.TB
	c   mqtt.Client
	srv *httptest.Server

	mu        sync.Mutex
	files     map[string][]byte
	hellos    map[string]*pb.Hello
	presence  map[string]bool
	records   map[string]map[uint64]*pb.InferenceRecord // device -> seq -> record
	gens      map[string]uint64
	events    map[string][]pb.EventKind
	downloads atomic.Int64
}

func newDirector(t testing.TB, broker string) *director {
	t.Helper()
	d := &director{t: t, files: map[string][]byte{}, hellos: map[string]*pb.Hello{}, presence: map[string]bool{},
		records: map[string]map[uint64]*pb.InferenceRecord{}, gens: map[string]uint64{}, events: map[string][]pb.EventKind{}}
	d.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.mu.Lock()
		data, ok := d.files[r.URL.Path]
		d.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		d.downloads.Add(1)
		http.ServeContent(w, r, "", time.Unix(0, 0), strings.NewReader(string(data)))
	}))
	t.Cleanup(d.srv.Close)
	opts := mqtt.NewClientOptions().AddBroker(broker).SetClientID("test-director").SetCleanSession(true).SetOrderMatters(true)
	d.c = mqtt.NewClient(opts)
	if tok := d.c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("director connect: %v", tok.Error())
	}
	filters := map[string]byte{}
	for _, k := range []wire.Kind{wire.KindHello, wire.KindPresence, wire.KindTelemetry, wire.KindEvents} {
		filters[wire.AllDevices(k)] = 1
	}
	tok := d.c.SubscribeMultiple(filters, func(_ mqtt.Client, m mqtt.Message) {
		if len(m.Payload()) == 0 {
			return
		}
		env, err := wire.Open(m.Topic(), m.Payload())
		if err != nil {
			t.Errorf("director: malformed message on %s: %v", m.Topic(), err)
			return
		}
		id, kind, _ := wire.ParseTopic(m.Topic())
		d.mu.Lock()
		defer d.mu.Unlock()
		switch kind {
		case wire.KindHello:
			d.hellos[id] = env.GetHello()
		case wire.KindEvents:
			d.events[id] = append(d.events[id], env.GetEvent().GetKind())
		case wire.KindPresence:
			d.presence[id] = env.GetPresence().GetOnline()
		case wire.KindTelemetry:
			if d.records[id] == nil {
				d.records[id] = map[uint64]*pb.InferenceRecord{}
			}
			ack := &pb.TelemetryAck{SpoolEpoch: env.GetTelemetry().GetSpoolEpoch()}
			for _, r := range env.GetTelemetry().GetRecords() {
				if inf := r.GetInference(); inf != nil {
					d.records[id][r.GetSeq()] = inf
				}
				ack.Stored = append(ack.Stored, &pb.SeqRange{First: r.GetSeq(), Last: r.GetSeq()})
			}
			// Stored (in memory): ack, so the device deletes and sends on.
			if payload, err := wire.Seal(id, time.Now(), ack); err == nil {
				d.c.Publish(wire.Topic(id, wire.KindAck), 1, false, payload)
			}
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("director subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { d.c.Disconnect(0) })
	return d
}

// assign serves bundle data and publishes a desired state with it to ids.
func (d *director) assign(data []byte, name, version string, ids ...string) {
	d.t.Helper()
	sum := sha256.Sum256(data)
	digest := hex.EncodeToString(sum[:])
	path := "/v1/artifacts/" + digest
	d.mu.Lock()
	d.files[path] = data
	d.mu.Unlock()
	for _, id := range ids {
		d.mu.Lock()
		d.gens[id]++
		gen := d.gens[id]
		d.mu.Unlock()
		raw, err := proto.Marshal(&pb.DesiredState{DeviceId: id, Generation: gen, IssuedAtUnixMs: time.Now().UnixMilli(),
			Slots: []*pb.SlotAssignment{{Slot: "default", Model: &pb.ModelRef{Name: name, Version: version, BundleSha256: digest}, Url: path, Size: int64(len(data))}}})
		if err != nil {
			d.t.Fatal(err)
		}
		payload, err := wire.Seal(id, time.Now(), &pb.SignedDesiredState{Desired: raw, KeyId: "test"})
		if err != nil {
			d.t.Fatal(err)
		}
		if tok := d.c.Publish(wire.Topic(id, wire.KindDesired), 1, true, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			d.t.Fatalf("publish desired to %s: %v", id, tok.Error())
		}
	}
}

func (d *director) hello(id string) *pb.Hello {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.hellos[id]
}

func (d *director) hasEvent(id string, kind pb.EventKind) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, k := range d.events[id] {
		if k == kind {
			return true
		}
	}
	return false
}

func (d *director) online(id string) (online, known bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	online, known = d.presence[id]
	return online, known
}

// inferences counts the distinct inference records a device sent, and
// those with an error.
func (d *director) inferences(id string) (all, failed int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, r := range d.records[id] {
		all++
		if r.GetError() != "" {
			failed++
		}
	}
	return all, failed
}

func eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	defer func(start time.Time) { t.Logf("%s: %s", what, time.Since(start)) }(time.Now())
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s; last: %s", timeout, what, last)
}

// model builds the example fraud-score model (an XGBoost ensemble compiled
// to a 10 KB module by models/compiler) at version: real, and small enough
// that tests with many devices download and load it in milliseconds.
func model(t testing.TB, version string) []byte {
	t.Helper()
	spec, err := compiler.ReadSpec("../../models/examples/fraud-score")
	if err != nil {
		t.Fatal(err)
	}
	spec.Version = version
	r, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	data, err := r.Bundle.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// testHost shares the test suite's on-disk compilation cache, so a Go
// guest compiles once for every test run (and not at all under -race).
func testHost(t testing.TB) *host.Host {
	t.Helper()
	return modeltest.NewHost(t, host.Options{Logger: slog.New(slog.DiscardHandler)})
}

// startSim runs a Sim until the test ends and waits for its devices to join.
func startSim(t *testing.T, o Options) *Sim {
	t.Helper()
	o.AllowUnsigned = true // the test director publishes unsigned states
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30s of its context ending")
		}
	})
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if err := s.WaitJoined(wctx); err != nil {
		t.Fatal(err)
	}
	return s
}

func ids(as []*Agent) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = a.ID
	}
	return out
}

// A fleet joins with its labels; the offline quarter says hello and then
// drops off; a model assigned to all is downloaded by each device but
// loaded once; the offline devices catch up when they come back.
func TestSimJoinDeployOffline(t *testing.T) {
	broker := startBroker(t)
	d := newDirector(t, broker)
	labels, err := ParseLabels("region=eu:3,us:1;site=s1..s4")
	if err != nil {
		t.Fatal(err)
	}
	s := startSim(t, Options{
		Agents: 16, Broker: broker, Controller: d.srv.URL, Labels: labels, Seed: 3,
		Offline: 0.25, Host: testHost(t), MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond,
	})
	agents := s.Agents()
	eventually(t, 10*time.Second, "every hello", func() (bool, string) {
		for _, a := range agents {
			if d.hello(a.ID) == nil {
				return false, a.ID + " joined, but its hello has not arrived"
			}
		}
		return true, ""
	})
	regions := map[string]int{}
	var offline []*Agent
	for _, a := range agents {
		h := d.hello(a.ID)
		if fmt.Sprint(h.GetLabels()) != fmt.Sprint(a.Labels) {
			t.Errorf("%s said labels %v, the simulator gave it %v", a.ID, h.GetLabels(), a.Labels)
		}
		regions[a.Labels["region"]]++
		if !a.Online() {
			offline = append(offline, a)
		}
	}
	if regions["eu"] != 12 || regions["us"] != 4 {
		t.Errorf("regions %v, want eu 12 and us 4", regions)
	}
	if len(offline) != 4 {
		t.Fatalf("%d devices offline, want 4 of 16", len(offline))
	}
	eventually(t, 10*time.Second, "offline devices' last will", func() (bool, string) {
		for _, a := range offline {
			if on, known := d.online(a.ID); !known || on || a.Connected() {
				return false, fmt.Sprintf("%s: presence known=%v online=%v connected=%v", a.ID, known, on, a.Connected())
			}
		}
		return true, ""
	})

	data := model(t, "1.0.0")
	d.assign(data, "fraud-score", "1.0.0", ids(agents)...)
	eventually(t, 60*time.Second, "the model active on the online devices", func() (bool, string) {
		for _, a := range agents {
			if got := a.Active("default"); a.Online() && got != "fraud-score@1.0.0" {
				return false, a.ID + " runs " + got
			}
		}
		return true, ""
	})
	for _, a := range offline {
		if got := a.Active("default"); got != "" {
			t.Errorf("offline device %s runs %s; it cannot have received the desired state", a.ID, got)
		}
	}
	for _, a := range offline {
		a.SetOnline(true)
	}
	eventually(t, 60*time.Second, "the offline devices catching up", func() (bool, string) {
		for _, a := range offline {
			if got := a.Active("default"); got != "fraud-score@1.0.0" {
				return false, a.ID + " runs " + got
			}
		}
		return true, ""
	})
	st := s.Stats()
	if st.ModelLoads != 1 || st.ModelsLoaded != 1 {
		t.Errorf("16 devices on one bundle: %d loads, %d loaded; want 1 and 1 (shared)", st.ModelLoads, st.ModelsLoaded)
	}
	if n := d.downloads.Load(); n < 16 {
		t.Errorf("%d downloads; every device must download its own copy", n)
	}
	if st.Joined != 16 || st.Connected != 16 || st.Online != 16 || st.Powered != 16 {
		t.Errorf("stats %+v: want all 16 joined, connected, online and powered", st)
	}
	if st.Published == 0 || st.Received == 0 {
		t.Errorf("stats %+v: no messages counted", st)
	}
	if st.Running["fraud-score@1.0.0"] != 16 || len(st.Running) != 1 {
		t.Errorf("stats say the devices run %v; want fraud-score@1.0.0 on all 16", st.Running)
	}
}

// The failing devices fail exactly the named model version, at the rate
// asked; every outcome reaches the broker as telemetry.
func TestSimInferenceAndFailures(t *testing.T) {
	broker := startBroker(t)
	d := newDirector(t, broker)
	s := startSim(t, Options{
		Agents: 8, Broker: broker, Controller: d.srv.URL, Seed: 9, Host: testHost(t),
		Rate: 40, Failing: 0.5, FailModel: "fraud-score@1.0.0",
		AckTimeout: time.Second,
	})
	agents := s.Agents()
	d.assign(model(t, "1.0.0"), "fraud-score", "1.0.0", ids(agents)...)
	eventually(t, 60*time.Second, "model active on every device", func() (bool, string) {
		for _, a := range agents {
			if a.Active("default") == "" {
				return false, a.ID + " runs nothing"
			}
		}
		return true, ""
	})
	eventually(t, 60*time.Second, "inferences on every device", func() (bool, string) {
		for _, a := range agents {
			if n := a.Stats().Inferences; n < 20 {
				return false, fmt.Sprintf("%s made %d inferences", a.ID, n)
			}
		}
		return true, ""
	})
	failing := 0
	for _, a := range agents {
		st := a.Stats()
		if a.Failing() {
			failing++
			if st.InferenceErrors != st.Inferences {
				t.Errorf("failing device %s: %d of %d inferences failed, want all", a.ID, st.InferenceErrors, st.Inferences)
			}
		} else if st.InferenceErrors != 0 {
			t.Errorf("healthy device %s: %d of %d inferences failed", a.ID, st.InferenceErrors, st.Inferences)
		}
		res, err := a.Infer(context.Background())
		if res.Version != "1.0.0" {
			t.Errorf("%s: Infer answered with version %q (%v)", a.ID, res.Version, err)
		}
		if a.Failing() != errors.Is(err, ErrSimulatedFailure) || a.Failing() != errors.Is(err, host.ErrGuest) {
			t.Errorf("%s (failing %v): Infer error %v", a.ID, a.Failing(), err)
		}
	}
	if failing != 4 {
		t.Fatalf("%d failing devices, want 4 of 8", failing)
	}
	// The telemetry the broker carried shows the same.
	eventually(t, 30*time.Second, "telemetry of the inferences", func() (bool, string) {
		for _, a := range agents {
			all, failed := d.inferences(a.ID)
			if all < 20 || (a.Failing() && failed != all) || (!a.Failing() && failed != 0) {
				return false, fmt.Sprintf("%s (failing %v): %d records, %d failed", a.ID, a.Failing(), all, failed)
			}
		}
		return true, ""
	})
	st := s.Stats()
	if st.Failing != 4 || st.Inferences == 0 || st.InferenceErrors == 0 {
		t.Errorf("stats %+v", st)
	}
	// Inference rate: 8 devices at 40/s for the time the test ran.
	if st.Inferences < 8*20 {
		t.Errorf("%d inferences in all, want at least 160", st.Inferences)
	}
}

// A power cut leaves no goodbye (the broker sends the last will); power
// back on restores the model from the device's disk, no new download.
func TestSimPowerCycle(t *testing.T) {
	broker := startBroker(t)
	d := newDirector(t, broker)
	s := startSim(t, Options{
		Agents: 3, Broker: broker, Controller: d.srv.URL, Host: testHost(t),
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		Network: Network{Delay: 5 * time.Millisecond, Jitter: 5 * time.Millisecond, Loss: 0.02},
	})
	a := s.Agent("sim-1")
	if a == nil {
		t.Fatalf("no device sim-1 in %v", ids(s.Agents()))
	}
	d.assign(model(t, "1.0.0"), "fraud-score", "1.0.0", a.ID)
	// Power is cut once nothing is in flight: an agent stopping with a
	// publish in flight waits for it (up to 10s) before it stops.
	eventually(t, 60*time.Second, "model active", func() (bool, string) {
		return a.Active("default") != "" && d.hasEvent(a.ID, pb.EventKind_EVENT_KIND_ACTIVATED) && a.Stats().InFlight == 0,
			fmt.Sprintf("active %q, %d in flight", a.Active("default"), a.Stats().InFlight)
	})
	downloads := d.downloads.Load()
	connects := a.Stats().Connects

	a.PowerOff()
	eventually(t, 10*time.Second, "last will after the power cut", func() (bool, string) {
		on, known := d.online(a.ID)
		return known && !on && !a.Connected(), fmt.Sprintf("online %v connected %v", on, a.Connected())
	})
	if _, err := a.Infer(context.Background()); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("Infer on a powered-off device: %v, want ErrNotRunning", err)
	}
	if st := s.Stats(); st.Powered != 2 {
		t.Fatalf("powered %d, want 2", st.Powered)
	}
	a.PowerOn()
	eventually(t, 30*time.Second, "back online", func() (bool, string) {
		on, _ := d.online(a.ID)
		return on && a.Connected() && a.Stats().Connects > connects, fmt.Sprintf("online %v connected %v", on, a.Connected())
	})
	if got := a.Active("default"); got != "fraud-score@1.0.0" {
		t.Fatalf("after power on the device runs %q", got)
	}
	if res, err := a.Infer(context.Background()); err != nil || res.Version != "1.0.0" {
		t.Fatalf("Infer after power on: %v %v", res, err)
	}
	if n := d.downloads.Load(); n != downloads {
		t.Errorf("%d downloads after the power cycle, was %d; the bundle was on the device's disk", n, downloads)
	}
}

// NeverSeen offline devices never connect; the rest join.
func TestSimNeverSeen(t *testing.T) {
	broker := startBroker(t)
	d := newDirector(t, broker)
	s := startSim(t, Options{Agents: 10, Broker: broker, Controller: d.srv.URL, Host: testHost(t), Offline: 0.3, NeverSeen: true})
	time.Sleep(200 * time.Millisecond)
	unseen := 0
	for _, a := range s.Agents() {
		if d.hello(a.ID) == nil {
			unseen++
			if a.Online() || a.Joined() || a.Stats().Connects != 0 {
				t.Errorf("%s: never-seen device online=%v joined=%v connects=%d", a.ID, a.Online(), a.Joined(), a.Stats().Connects)
			}
		}
	}
	if unseen != 3 {
		t.Fatalf("%d devices unseen, want 3", unseen)
	}
	if _, err := s.Agents()[0].Infer(context.Background()); err != nil && !errors.Is(err, deploy.ErrNoModel) {
		t.Fatalf("Infer with no model: %v, want ErrNoModel", err)
	}
}

func TestOptionsValidate(t *testing.T) {
	ok := Options{Agents: 1, Broker: "tcp://127.0.0.1:1883", Controller: "http://127.0.0.1:8080", AllowUnsigned: true}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		change func(*Options)
		want   string
	}{
		{func(o *Options) { o.Agents = 0 }, "agents 0"},
		{func(o *Options) { o.Agents = MaxAgents + 1 }, "agents"},
		{func(o *Options) { o.Broker = "" }, "broker"},
		{func(o *Options) { o.Controller = "" }, "controller"},
		{func(o *Options) { o.Offline = 1.5 }, "offline fraction"},
		{func(o *Options) { o.Failing = -1 }, "failing fraction"},
		{func(o *Options) { o.FailRate = 2 }, "fail rate"},
		{func(o *Options) { o.Rate = -1 }, "rate"},
		{func(o *Options) { o.FailModel = "@1.0.0" }, "fail model"},
		{func(o *Options) { o.FailModel = "m@" }, "fail model"},
		{func(o *Options) { o.Network.Loss = 1 }, "loss"},
		{func(o *Options) { o.IDPrefix = "bad prefix/" }, "id prefix"},
		{func(o *Options) { o.DirectorKeys = []string{"/nonexistent/director.pub"} }, "key /nonexistent/director.pub"},
		{func(o *Options) { o.AllowUnsigned = false }, "--allow-unsigned"},
	} {
		o := ok
		tt.change(&o)
		err := o.Validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: %v, want an error about %q", o, err, tt.want)
		}
	}
}
