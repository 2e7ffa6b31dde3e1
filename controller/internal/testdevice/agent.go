package testdevice

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// Behavior is how a fake agent treats one model version.
type Behavior struct {
	// FailDownload makes the download fail with this detail; the agent
	// gives up and keeps the running version.
	FailDownload string
	// RollBack makes the agent switch back to the previous version at the
	// end of its health watch, reporting this reason.
	RollBack string
	// NeverHealthy makes the agent activate the version but never report
	// it healthy.
	NeverHealthy bool
	// Inferences is how many inference records the agent sends after
	// activating the version (and for its first version, on connect).
	Inferences int
	// Latency is the latency of each inference.
	Latency time.Duration
	// Every, if set, sends the Inferences again every Every while the
	// version is active: traffic that keeps coming, which the latency gate
	// needs (it judges minutes after the one a device activated in).
	Every time.Duration
	// ErrorRate is the fraction of inferences that fail.
	ErrorRate float64
	// Download is how long the download takes.
	Download time.Duration
	// LateReports makes the agent, once it activated the version, send
	// reports from before the activation again, as an agent whose
	// connection dropped re-sends what the broker had not acknowledged:
	// its state showing the version still pending, and a download failure
	// (stamped before the activation) that it had retried.
	LateReports bool
}

// Agent is a fake agent: it speaks the wire protocol the way the real
// agent does for rollouts (events with the rollout id, retained state with
// active, previous and healthy per slot, health watch for the policy's
// watch time, local rollback) without running any model. It reconnects
// and says hello again when the broker goes away, like the real one.
type Agent struct {
	ID     string
	t      testing.TB
	labels map[string]string
	c      paho.Client

	mu        sync.Mutex
	behaviors map[string]Behavior // by version; "" is the default
	gen       uint64
	slots     map[string]*pb.SlotState
	seq       uint64
	work      chan *pb.DesiredState
	done      chan struct{}
	history   []string // versions activated, in order
}

// StartAgent connects a fake agent with labels, running first (if not nil)
// in slot "default", and handles desired states until the test ends.
func StartAgent(t testing.TB, url, id string, labels map[string]string, first *pb.ModelRef, behaviors map[string]Behavior) *Agent {
	t.Helper()
	a := &Agent{
		ID: id, t: t, labels: labels, behaviors: behaviors, slots: map[string]*pb.SlotState{},
		work: make(chan *pb.DesiredState, 16), done: make(chan struct{}),
	}
	if a.behaviors == nil {
		a.behaviors = map[string]Behavior{}
	}
	if first != nil {
		a.slots["default"] = &pb.SlotState{Slot: "default", Active: first, Healthy: true, ActiveSinceUnixMs: time.Now().UnixMilli()}
	}
	willPayload, err := wire.Seal(id, time.Now(), &pb.Presence{Online: false})
	if err != nil {
		t.Fatal(err)
	}
	a.c = paho.NewClient(paho.NewClientOptions().
		AddBroker(url).
		SetClientID("fake-agent-"+id).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetConnectTimeout(Timeout).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(100*time.Millisecond).
		SetMaxReconnectInterval(500*time.Millisecond).
		SetBinaryWill(wire.Topic(id, wire.KindPresence), willPayload, 1, true).
		SetOnConnectHandler(func(c paho.Client) { go a.onConnect() }))
	tok := a.c.Connect()
	if !tok.WaitTimeout(Timeout) || tok.Error() != nil {
		t.Fatalf("agent %s: connect to %s: %v", id, url, tok.Error())
	}
	go a.loop()
	if every := a.every(); every > 0 {
		go a.stream(every)
	}
	t.Cleanup(a.Stop)
	return a
}

// Stop disconnects the agent (its last will is not sent: it says offline
// itself first).
func (a *Agent) Stop() {
	a.mu.Lock()
	select {
	case <-a.done:
		a.mu.Unlock()
		return
	default:
	}
	close(a.done)
	a.mu.Unlock()
	if a.c.IsConnectionOpen() {
		if payload, err := wire.Seal(a.ID, time.Now(), &pb.Presence{Online: false}); err == nil {
			a.c.Publish(wire.Topic(a.ID, wire.KindPresence), 1, true, payload).WaitTimeout(500 * time.Millisecond)
		}
	}
	a.c.Disconnect(50)
}

func (a *Agent) onConnect() {
	tok := a.c.Subscribe(wire.Topic(a.ID, wire.KindDesired), 1, func(_ paho.Client, m paho.Message) {
		if len(m.Payload()) == 0 {
			return
		}
		env, err := wire.Open(m.Topic(), m.Payload())
		if err != nil {
			a.t.Errorf("agent %s: bad desired state: %v", a.ID, err)
			return
		}
		var ds pb.DesiredState
		if err := proto.Unmarshal(env.GetDesired().GetDesired(), &ds); err != nil {
			a.t.Errorf("agent %s: bad desired state document: %v", a.ID, err)
			return
		}
		select {
		case a.work <- &ds:
		case <-a.done:
		}
	})
	tok.WaitTimeout(Timeout)
	a.send(wire.KindPresence, &pb.Presence{Online: true})
	a.send(wire.KindHello, &pb.Hello{Labels: a.labels, AgentVersion: "fake", State: a.state()})
	a.send(wire.KindState, a.state())
	a.mu.Lock()
	first := len(a.history) == 0
	var active *pb.ModelRef
	if s := a.slots["default"]; s != nil {
		active = s.GetActive()
	}
	a.mu.Unlock()
	if first && active != nil {
		a.infer(active)
	}
}

// send publishes body and waits a little for the ack; a message lost to
// a broker outage is made up for by the hello and state of the reconnect.
func (a *Agent) send(k wire.Kind, body proto.Message) {
	payload, err := wire.Seal(a.ID, time.Now(), body)
	if err != nil {
		a.t.Errorf("agent %s: seal: %v", a.ID, err)
		return
	}
	a.c.Publish(wire.Topic(a.ID, k), 1, k.Retained(), payload).WaitTimeout(2 * time.Second)
}

func (a *Agent) state() *pb.ReportedState {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := &pb.ReportedState{DesiredGeneration: a.gen, Health: pb.Health_HEALTH_OK, AgentVersion: "fake"}
	for _, s := range a.slots {
		st.Slots = append(st.Slots, proto.Clone(s).(*pb.SlotState))
	}
	return st
}

func (a *Agent) event(kind pb.EventKind, slot string, m *pb.ModelRef, gen uint64, rollout, detail string) {
	a.send(wire.KindEvents, &pb.Event{Kind: kind, Slot: slot, Model: m, Generation: gen, RolloutId: rollout, Detail: detail, AtUnixMs: time.Now().UnixMilli()})
}

// every is the shortest Every of the behaviors, 0 if none streams.
func (a *Agent) every() time.Duration {
	var d time.Duration
	for _, b := range a.behaviors {
		if b.Every > 0 && (d == 0 || b.Every < d) {
			d = b.Every
		}
	}
	return d
}

// stream sends the active version's inferences every tick, for the
// behaviors with Every set, until the agent stops.
func (a *Agent) stream(tick time.Duration) {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-a.done:
			return
		case <-t.C:
		}
		a.mu.Lock()
		var m *pb.ModelRef
		if s := a.slots["default"]; s != nil && s.GetActive() != nil && a.behavior(s.GetActive().GetVersion()).Every > 0 {
			m = s.GetActive()
		}
		a.mu.Unlock()
		if m != nil && a.c.IsConnectionOpen() {
			a.infer(m)
		}
	}
}

// infer sends the inference records the behavior of m asks for.
func (a *Agent) infer(m *pb.ModelRef) {
	a.mu.Lock()
	b := a.behavior(m.GetVersion())
	if b.Inferences == 0 {
		a.mu.Unlock()
		return
	}
	batch := &pb.TelemetryBatch{SpoolEpoch: "fake-" + a.ID}
	now := time.Now().UnixMilli()
	for i := range b.Inferences {
		a.seq++
		rec := &pb.InferenceRecord{Model: m.GetName(), Version: m.GetVersion(), AtUnixMs: now, LatencyUs: uint32(b.Latency / time.Microsecond)}
		// Deterministic share of failures, spread over the batch.
		if b.ErrorRate > 0 && float64(i%100) < b.ErrorRate*100 {
			rec.Error = "model trapped: unreachable"
			rec.LatencyUs = 0
		}
		// A little jitter, so percentiles are not all one value.
		if rec.LatencyUs > 0 {
			rec.LatencyUs += uint32(rand.IntN(int(rec.LatencyUs/20) + 1))
		}
		batch.Records = append(batch.Records, &pb.TelemetryRecord{Seq: a.seq, Body: &pb.TelemetryRecord_Inference{Inference: rec}})
	}
	a.mu.Unlock()
	a.send(wire.KindTelemetry, batch)
}

func (a *Agent) behavior(version string) Behavior {
	if b, ok := a.behaviors[version]; ok {
		return b
	}
	return a.behaviors[""]
}

func (a *Agent) loop() {
	for {
		select {
		case <-a.done:
			return
		case ds := <-a.work:
			a.apply(ds)
		}
	}
}

// apply converges to one desired state, the way the agent's deploy does.
func (a *Agent) apply(ds *pb.DesiredState) {
	a.mu.Lock()
	if ds.GetGeneration() <= a.gen || ds.GetDeviceId() != a.ID {
		a.mu.Unlock()
		return
	}
	gen := ds.GetGeneration()
	a.gen = gen
	want := map[string]*pb.SlotAssignment{}
	for _, s := range ds.GetSlots() {
		want[s.GetSlot()] = s
	}
	for name := range a.slots {
		if want[name] == nil {
			delete(a.slots, name)
		}
	}
	a.mu.Unlock()
	a.send(wire.KindState, a.state())
	for _, as := range ds.GetSlots() {
		a.install(gen, as)
	}
}

func (a *Agent) install(gen uint64, as *pb.SlotAssignment) {
	m := as.GetModel()
	a.mu.Lock()
	s := a.slots[as.GetSlot()]
	if s == nil {
		s = &pb.SlotState{Slot: as.GetSlot()}
		a.slots[as.GetSlot()] = s
	}
	if s.GetActive().GetBundleSha256() == m.GetBundleSha256() {
		a.mu.Unlock()
		return
	}
	b := a.behavior(m.GetVersion())
	s.Pending = m
	a.mu.Unlock()
	rid := as.GetRolloutId()
	a.event(pb.EventKind_EVENT_KIND_DOWNLOADING, as.GetSlot(), m, gen, rid, "")
	time.Sleep(b.Download)
	if b.FailDownload != "" && !as.GetRollback() {
		a.event(pb.EventKind_EVENT_KIND_FAILED, as.GetSlot(), m, gen, rid, b.FailDownload)
		a.mu.Lock()
		s.Pending, s.LastError = nil, b.FailDownload
		a.mu.Unlock()
		a.send(wire.KindState, a.state())
		return
	}
	a.event(pb.EventKind_EVENT_KIND_VERIFIED, as.GetSlot(), m, gen, rid, "")
	a.mu.Lock()
	old := s.Active
	s.Previous, s.Active, s.Pending, s.LastError = old, m, nil, ""
	s.ActiveSinceUnixMs = time.Now().UnixMilli()
	s.Healthy = false
	s.RolloutId = rid
	a.history = append(a.history, m.GetVersion())
	a.mu.Unlock()
	a.event(pb.EventKind_EVENT_KIND_ACTIVATED, as.GetSlot(), m, gen, rid, "")
	a.send(wire.KindState, a.state())
	if b.LateReports && !as.GetRollback() {
		// After the controller has seen the version active.
		time.Sleep(300 * time.Millisecond)
		a.sendLate(gen, as, old)
	}
	if as.GetRollback() {
		a.mu.Lock()
		s.Healthy = true
		a.mu.Unlock()
		a.send(wire.KindState, a.state())
		return
	}
	a.infer(m)
	if b.NeverHealthy {
		return
	}
	watch := time.Duration(as.GetHealth().GetWatchMs()) * time.Millisecond
	time.AfterFunc(watch, func() {
		select {
		case <-a.done:
			return
		default:
		}
		a.mu.Lock()
		if a.slots[as.GetSlot()] != s || s.GetActive().GetBundleSha256() != m.GetBundleSha256() {
			a.mu.Unlock()
			return // superseded: another version or the slot went
		}
		if b.RollBack != "" && old != nil {
			s.Previous, s.Active = m, old
			s.ActiveSinceUnixMs = time.Now().UnixMilli()
			s.Healthy, s.LastError = true, b.RollBack
			a.history = append(a.history, old.GetVersion())
			a.mu.Unlock()
			a.event(pb.EventKind_EVENT_KIND_ROLLED_BACK, as.GetSlot(), m, gen, rid, b.RollBack)
			a.send(wire.KindState, a.state())
			return
		}
		s.Healthy = true
		a.mu.Unlock()
		a.event(pb.EventKind_EVENT_KIND_HEALTHY, as.GetSlot(), m, gen, rid, "")
		a.send(wire.KindState, a.state())
	})
}

// sendLate sends the reports of LateReports: the state from before the
// activation of as (old active, as's model pending) and a failed download
// stamped a second before it. The stale state stands until the agent's
// next report (the end of its health watch).
func (a *Agent) sendLate(gen uint64, as *pb.SlotAssignment, old *pb.ModelRef) {
	st := a.state()
	for _, s := range st.Slots {
		if s.GetSlot() == as.GetSlot() {
			s.Active, s.Pending, s.Healthy = old, as.GetModel(), old != nil
		}
	}
	a.send(wire.KindState, st)
	a.send(wire.KindEvents, &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Slot: as.GetSlot(), Model: as.GetModel(), Generation: gen,
		RolloutId: as.GetRolloutId(), Detail: "download: EOF (retried)", AtUnixMs: time.Now().Add(-time.Second).UnixMilli()})
}

// Active returns the version active in slot "default", "" if none.
func (a *Agent) Active() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.slots["default"].GetActive().GetVersion()
}

// History returns the versions the agent activated, in order.
func (a *Agent) History() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.history...)
}

// String names the agent and what it runs, for test failures.
func (a *Agent) String() string {
	return fmt.Sprintf("%s(%s, history %v)", a.ID, a.Active(), a.History())
}
