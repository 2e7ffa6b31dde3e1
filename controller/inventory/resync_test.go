package inventory

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgefleet/edgefleet/controller/broker"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// startBroker runs the embedded broker on a free port.
func startBroker(t testing.TB) *broker.Broker {
	t.Helper()
	b, err := broker.New(broker.Options{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("broker: %v", err)
		}
	})
	if err := b.Open(); err != nil {
		t.Fatal(err)
	}
	return b
}

// commands is what the devices are sent on their cmd topics, read by one
// MQTT client subscribed to all of them, as the agents would.
type commands struct {
	mu  sync.Mutex
	got map[string][]string // device: command names, in order
	bad []string
}

func subscribeCommands(t *testing.T, b *broker.Broker) *commands {
	t.Helper()
	c := &commands{got: map[string][]string{}}
	cl := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + b.Addr().String()).SetClientID("devices").
		SetConnectTimeout(5 * time.Second).SetProtocolVersion(4))
	if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	t.Cleanup(func() { cl.Disconnect(100) })
	tok := cl.Subscribe(wire.AllDevices(wire.KindCmd), 1, func(_ paho.Client, m paho.Message) {
		c.mu.Lock()
		defer c.mu.Unlock()
		env, err := wire.Open(m.Topic(), m.Payload())
		if err != nil {
			c.bad = append(c.bad, err.Error())
			return
		}
		c.got[env.GetDeviceId()] = append(c.got[env.GetDeviceId()], env.GetCommand().GetName())
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return c
}

func (c *commands) snapshot() (map[string][]string, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string][]string, len(c.got))
	for id, names := range c.got {
		out[id] = slices.Clone(names)
	}
	return out, slices.Clone(c.bad)
}

func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s; last: %s", what, last)
}

func runInventory(t *testing.T, inv *Inventory) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("inventory: %v", err)
		}
	})
}

func submit(t *testing.T, inv *Inventory, u Update) {
	t.Helper()
	if u.At.IsZero() {
		u.At = time.Now()
	}
	if err := inv.Submit(t.Context(), u); err != nil {
		t.Fatal(err)
	}
}

func hello(id string) Update {
	return Update{DeviceID: id, Hello: &pb.Hello{AgentVersion: "1.0.0", Os: "linux", Arch: "arm64", Labels: map[string]string{"site": "a"}}}
}

func state(id string, depth uint64) Update {
	return Update{DeviceID: id, State: &pb.ReportedState{SpoolDepth: depth, Health: pb.Health_HEALTH_OK, AgentVersion: "1.0.0"}}
}

func presence(id string, online bool) Update {
	return Update{DeviceID: id, Presence: &pb.Presence{Online: online}}
}

// TestResyncAsksDevicesWithoutHello: through the real broker, the devices
// that send a state, an online presence, an event or telemetry without a
// stored hello are sent the resync command once, after the grace period;
// a device whose hello came first, one whose hello came within the grace
// (as an agent's presence comes before its hello), and one that only left
// (its last will) are not; once the device says hello again its record is
// complete and its messages ask nothing more.
func TestResyncAsksDevicesWithoutHello(t *testing.T) {
	st := openStore(t)
	b := startBroker(t)
	cmds := subscribeCommands(t, b)
	const grace = time.Second
	inv := New(st, nil, nil, WithResync(b, st), WithResyncLimits(grace, time.Hour, 1000))
	runInventory(t, inv)
	ctx := t.Context()

	// The hello of "greeted" is stored before its state, in the same
	// group or an earlier one: its state asks nothing.
	submit(t, inv, hello("greeted"))
	submit(t, inv, state("greeted", 1))
	submit(t, inv, state("stateful", 1))
	submit(t, inv, presence("present", true))
	submit(t, inv, presence("newcomer", true))
	submit(t, inv, hello("newcomer"))
	submit(t, inv, presence("gone", false))
	submit(t, inv, Update{DeviceID: "eventful", Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_HEALTHY}})
	if err := inv.Seen(ctx, "telemetric"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	want := map[string][]string{"stateful": {"resync"}, "present": {"resync"}, "eventful": {"resync"}, "telemetric": {"resync"}}
	waitFor(t, "four resync commands", func() (bool, string) {
		got, bad := cmds.snapshot()
		return len(got) >= len(want), fmt.Sprint(got, bad)
	})
	if waited := time.Since(start); waited < grace {
		t.Fatalf("devices asked after %v, before their grace of %v", waited, grace)
	}
	// More messages of the same devices, within the interval: no more
	// commands. The state of "stateful" comes after its hello (its
	// answer) and completes its record.
	submit(t, inv, hello("stateful"))
	for i := range 5 {
		for _, id := range []string{"greeted", "stateful", "present", "eventful"} {
			submit(t, inv, state(id, uint64(i+2)))
		}
		if err := inv.Seen(ctx, "telemetric"); err != nil {
			t.Fatal(err)
		}
	}
	// One more device at the end: once its command is in, every message
	// before it was checked (the checks run in order).
	submit(t, inv, state("last", 1))
	want["last"] = []string{"resync"}
	waitFor(t, "the last device's command", func() (bool, string) {
		got, _ := cmds.snapshot()
		return len(got["last"]) > 0, fmt.Sprint(got)
	})
	got, bad := cmds.snapshot()
	if fmt.Sprint(got) != fmt.Sprint(want) || len(bad) > 0 {
		t.Fatalf("commands %v (undecodable: %v), want %v", got, bad, want)
	}
	d, err := st.Device(ctx, "stateful")
	if err != nil {
		t.Fatal(err)
	}
	if d.Labels["site"] != "a" || d.OS != "linux" || d.SpoolDepth != 6 {
		t.Fatalf("after its hello, device %+v", d)
	}
	if n := inv.rs.sent.Value(); n != uint64(len(want)) {
		t.Fatalf("resyncs_total %v, want 5", n)
	}
}

// fakeClock is the resyncer's clock in the tests of its limits.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestResyncLimits: the resyncer's limits on a fake clock, stepping its
// check and send by hand: nobody is asked before the grace ends, nor if
// its hello comes meanwhile; all devices together get at most rate
// commands a second, those over it wait their turn in order; and a device
// that still has no hello is asked again only after the interval.
func TestResyncLimits(t *testing.T) {
	st := openStore(t)
	b := startBroker(t)
	cmds := subscribeCommands(t, b)
	const rate, grace, interval = 4, 5 * time.Second, time.Minute
	inv := New(st, nil, nil, WithResync(b, st), WithResyncLimits(grace, interval, rate))
	clk := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	r := inv.rs
	r.now = clk.Now
	ctx := t.Context()

	var ids []string
	var recs []store.DeviceUpdate
	for i := range 10 {
		id := fmt.Sprintf("dev-%02d", i)
		ids = append(ids, id)
		recs = append(recs, store.DeviceUpdate{ID: id, At: clk.Now(), Report: &store.Report{Health: store.HealthOK}})
	}
	if _, err := st.ApplyDeviceUpdates(ctx, recs); err != nil {
		t.Fatal(err)
	}
	step := func() time.Duration {
		r.check(ctx)
		return r.send()
	}
	sent := func() uint64 { return r.sent.Value() }

	r.notice(ids)
	r.notice(ids) // the same devices again: still one command each
	if wait := step(); sent() != 0 || wait != grace {
		t.Fatalf("within the grace: %v sent, next in %v; want 0 and %v", sent(), wait, grace)
	}
	// One device says hello within its grace: it is not asked.
	hi := func(id string) {
		if err := inv.Hello(ctx, id, clk.Now(), hello(id).Hello); err != nil {
			t.Fatal(err)
		}
	}
	hi(ids[9])
	clk.add(grace)
	if wait := step(); sent() != rate || wait <= 0 || wait > time.Second/rate {
		t.Fatalf("first step: %v sent, next in %v; want %d and at most %v", sent(), wait, rate, time.Second/rate)
	}
	if wait := step(); sent() != rate || wait <= 0 {
		t.Fatalf("no time passed: %v sent, next in %v", sent(), wait)
	}
	clk.add(time.Second / 2) // two tokens
	step()
	if sent() != rate+2 {
		t.Fatalf("half a second later: %v sent, want %d", sent(), rate+2)
	}
	// One says hello while it waits for the rate: it is not asked.
	hi(ids[8])
	clk.add(10 * time.Second)
	if wait := step(); sent() != 8 || wait != 0 {
		t.Fatalf("after the wait: %v sent, next in %v; want 8 and nothing pending", sent(), wait)
	}
	waitFor(t, "eight commands delivered", func() (bool, string) {
		got, _ := cmds.snapshot()
		return len(got) == 8, fmt.Sprint(got)
	})
	got, _ := cmds.snapshot()
	for _, id := range ids[:8] {
		if len(got[id]) != 1 {
			t.Errorf("%s was sent %v", id, got[id])
		}
	}

	// Within the interval, the devices talk on: nothing is sent, and the
	// store is not read.
	clk.add(interval / 2)
	r.notice(ids)
	if step(); sent() != 8 {
		t.Fatalf("within the interval: %v sent", sent())
	}
	// Past it, those still without a hello are asked again, after their
	// grace.
	clk.add(interval)
	r.notice(ids)
	if step(); sent() != 8 {
		t.Fatalf("after the interval, within the grace: %v sent", sent())
	}
	clk.add(grace)
	if step(); sent() != 12 {
		t.Fatalf("after the interval: %v sent, want 12", sent())
	}
	clk.add(time.Second)
	if step(); sent() != 16 {
		t.Fatalf("after the interval: %v sent, want 16", sent())
	}
}
