package sim

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/spool"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Agent is one simulated device: a real agent and the knobs of its
// simulated world (power and network).
//
// Device states:
//
//	powered, online:   the agent runs and keeps a broker session
//	powered, offline:  the agent runs (serves, spools) but every dial
//	                   fails; SetOnline(false) cuts the open connection,
//	                   so the broker publishes the device's last will
//	powered off:       no agent runs; the data directory and the spool
//	                   stay, as a device's disk would
//
// PowerOff cuts the network first, so the agent gets no chance to say
// goodbye: it is a power cut, not a shutdown.
type Agent struct {
	// ID is the device id; Labels its labels. Do not modify them.
	ID     string
	Labels map[string]string

	sim     *Sim
	failing bool
	offline bool // chosen to be offline; goes offline after it first joins

	spool   *spool.Memory
	power   atomic.Bool
	online  atomic.Bool
	joined  atomic.Bool
	powerCh chan struct{} // wakes the supervisor on a power change
	cur     atomic.Pointer[agent.Agent]
	cancel  atomic.Pointer[context.CancelFunc]

	mu    sync.Mutex
	conns map[*conn]bool // open broker connections: true once CONNACKed
	// sessions counts the true ones of conns, for Connected without the
	// lock (Stats asks every device five times a second).
	sessions atomic.Int32
	models   []*agentModel // what the agent has loaded, oldest first
	// stateID is the packet id of the last state PUBLISH on the current
	// connection; its PUBACK means the broker has the device's state.
	stateID   uint16
	stateConn *conn

	count struct {
		inferences, errors, published, received, connects atomic.Uint64
	}
	// inflight counts QoS 1 publishes on the current connection that the
	// broker has not acknowledged yet.
	inflight atomic.Int64

	// running caches what runs in the device's slots for Stats (see
	// running()); runningStale says it must be read again.
	running      atomic.Pointer[runningSnap]
	runningStale atomic.Bool
}

// runningSnap is what ran in a device's slots ("name@version" per active
// slot) when it was read.
type runningSnap struct {
	at     time.Time
	active []string
}

// runningMaxAge is how old Stats lets a device's cached slots get when
// nothing said they changed: a safety net, since every change the agent
// makes while connected is reported in a state message (which marks the
// cache stale), and one while disconnected is reported on reconnecting.
const runningMaxAge = 5 * time.Second

// runningNow returns the active "name@version" of each slot, from the
// cache unless the device sent a state report or (re)started since it
// was filled, or it is older than runningMaxAge. Reading every device's
// slots from the agent (a protobuf message per slot, under the agent's
// locks) five times a second was a sixth of the simulator's CPU in a
// 10,000-device rollout.
func (a *Agent) runningNow(now time.Time) []string {
	if snap := a.running.Load(); snap != nil && !a.runningStale.Load() && now.Sub(snap.at) < runningMaxAge {
		return snap.active
	}
	a.runningStale.Store(false) // before reading: a change from now on marks it again
	snap := &runningSnap{at: now}
	for _, sl := range a.Slots() {
		if m := sl.GetActive(); m != nil {
			snap.active = append(snap.active, m.GetName()+"@"+m.GetVersion())
		}
	}
	a.running.Store(snap)
	return snap.active
}

// Failing reports whether the device was chosen to fail its model.
func (a *Agent) Failing() bool { return a.failing }

// Online reports whether the device has a network.
func (a *Agent) Online() bool { return a.online.Load() }

// Powered reports whether the device's agent runs.
func (a *Agent) Powered() bool { return a.power.Load() }

// Joined reports whether the device has reported its state to the broker
// at least once.
func (a *Agent) Joined() bool { return a.joined.Load() }

// Connected reports whether the device has a broker session now.
func (a *Agent) Connected() bool { return a.sessions.Load() > 0 }

// SetOnline gives the device its network back, or takes it away (which
// cuts its broker connection at once). A device coming back online
// reconnects after its current backoff delay (MaxBackoff at most).
func (a *Agent) SetOnline(up bool) {
	if a.online.Swap(up) == up || up {
		return
	}
	a.cut()
}

// PowerOff stops the device's agent abruptly: the network goes first, so
// no goodbye reaches the broker and the broker publishes the last will.
// The data directory and spool stay for PowerOn.
func (a *Agent) PowerOff() {
	if !a.power.Swap(false) {
		return
	}
	a.cut()
	if c := a.cancel.Load(); c != nil {
		(*c)()
	}
	a.wake()
}

// PowerOn starts the device's agent again: it restores its models from
// its data directory and reconnects (if online).
func (a *Agent) PowerOn() {
	if a.power.Swap(true) {
		return
	}
	a.wake()
}

func (a *Agent) wake() {
	select {
	case a.powerCh <- struct{}{}:
	default:
	}
}

// Slots returns what runs in each slot, as the agent reports it; nil
// while it is powered off.
func (a *Agent) Slots() []*pb.SlotState {
	if ag := a.cur.Load(); ag != nil {
		return ag.Slots()
	}
	return nil
}

// Active returns "name@version" of the model active in slot, or "".
func (a *Agent) Active(slot string) string {
	for _, s := range a.Slots() {
		if s.GetSlot() == slot && s.GetActive() != nil {
			return s.GetActive().GetName() + "@" + s.GetActive().GetVersion()
		}
	}
	return ""
}

// ErrNotRunning is returned by Infer while the device is powered off.
var ErrNotRunning = errors.New("the simulated device is powered off")

// Infer runs one inference through the agent, as an app on the device
// would, on the model it loaded last, with one of that model's sample
// inputs (its golden test inputs). The outcome is recorded by the agent
// for telemetry. It returns what answered, or an error wrapping
// deploy.ErrNoModel when no model is active.
func (a *Agent) Infer(ctx context.Context) (agent.Result, error) {
	ag := a.cur.Load()
	if ag == nil || !a.power.Load() {
		return agent.Result{}, ErrNotRunning
	}
	m := a.lastModel()
	if m == nil {
		return agent.Result{}, fmt.Errorf("%w: device %s has loaded none", deploy.ErrNoModel, a.ID)
	}
	res, err := ag.Infer(ctx, m.Manifest().Name, m.request())
	if errors.Is(err, deploy.ErrNoModel) {
		return res, err
	}
	a.count.inferences.Add(1)
	a.sim.stats.inferences.Add(1)
	if err != nil {
		a.count.errors.Add(1)
		a.sim.stats.errors.Add(1)
	}
	return res, err
}

// AgentStats are one device's counters.
type AgentStats struct {
	Inferences, InferenceErrors uint64
	// Published and Received count MQTT PUBLISH packets; InFlight is how
	// many QoS 1 publishes on the current connection await the broker's
	// acknowledgement.
	Published, Received uint64
	InFlight            int64
	Connects            uint64
	SpoolDepth          uint64
}

// Stats returns the device's counters.
func (a *Agent) Stats() AgentStats {
	st := AgentStats{
		Inferences: a.count.inferences.Load(), InferenceErrors: a.count.errors.Load(),
		Published: a.count.published.Load(), Received: a.count.received.Load(), Connects: a.count.connects.Load(),
		InFlight: a.inflight.Load(),
	}
	if ss, err := a.spool.Stats(context.Background()); err == nil {
		st.SpoolDepth = ss.Depth
	}
	return st
}

// supervise runs the device's agent while it is powered, until ctx ends.
func (a *Agent) supervise(ctx context.Context, dir string) {
	defer a.spool.Close()
	for ctx.Err() == nil {
		if !a.power.Load() {
			select {
			case <-ctx.Done():
				return
			case <-a.powerCh:
			}
			continue
		}
		ag, err := agent.New(a.sim.agentConfig(a, dir), a.sim.agentOptions(a))
		if err != nil {
			// A configuration the agent refuses will not change: say so
			// once and leave the device off.
			a.sim.log.Error("simulated device cannot start", "device", a.ID, "err", err)
			a.power.Store(false)
			continue
		}
		actx, cancel := context.WithCancel(ctx)
		a.cancel.Store(&cancel)
		if !a.power.Load() { // powered off since the check above
			cancel()
		}
		a.cur.Store(ag)
		a.runningStale.Store(true)
		err = ag.Run(actx)
		a.cur.Store(nil)
		a.runningStale.Store(true)
		a.cancel.Store(nil)
		cancel()
		if err != nil && ctx.Err() == nil {
			a.sim.log.Error("simulated device stopped with an error; restarting it in a second", "device", a.ID, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// dialBroker is the agent's dialer: it fails while the device is offline
// and otherwise opens a tracked, shaped connection.
func (a *Agent) dialBroker(ctx context.Context, _, addr string) (net.Conn, error) {
	if !a.online.Load() || !a.power.Load() {
		return nil, errNetworkDown
	}
	c, err := a.sim.dial.dial(ctx, addr, a)
	if err != nil {
		return nil, err
	}
	c.onClose = a.forget
	a.mu.Lock()
	a.conns[c] = false
	a.mu.Unlock()
	a.inflight.Store(0) // paho sends the unacknowledged ones again, and they are counted again
	// Went offline while dialling: do not keep the connection.
	if !a.online.Load() || !a.power.Load() {
		c.Close()
		return nil, errNetworkDown
	}
	a.count.connects.Add(1)
	a.sim.stats.connects.Add(1)
	return c, nil
}

// forget drops a closed connection.
func (a *Agent) forget(c *conn) {
	a.mu.Lock()
	if a.conns[c] {
		a.sessions.Add(-1)
	}
	delete(a.conns, c)
	if a.stateConn == c {
		a.stateConn = nil
	}
	a.mu.Unlock()
}

// cut closes every open broker connection of the device.
func (a *Agent) cut() {
	a.mu.Lock()
	cs := make([]*conn, 0, len(a.conns))
	for c := range a.conns {
		cs = append(cs, c)
	}
	a.mu.Unlock()
	for _, c := range cs {
		c.cut()
	}
}

// MQTT packet types the device tracker reads besides PUBLISH and PUBACK.
const pktConnack = 2

// sent is called for every MQTT packet the agent writes. It runs on the
// writing goroutine and must be quick.
func (a *Agent) sent(c *conn, typ, flags byte, body []byte) {
	if typ != pktPublish {
		return
	}
	a.count.published.Add(1)
	a.sim.stats.published.Add(1)
	if (flags>>1)&3 > 0 {
		a.inflight.Add(1)
	}
	topic, id, ok := publishInfo(flags, body)
	if !ok || !isKind(topic, "state") {
		return
	}
	// The agent reports its state when its slots changed: what Stats
	// cached is out of date.
	a.runningStale.Store(true)
	if !a.joined.Load() {
		a.mu.Lock()
		a.stateID, a.stateConn = id, c
		a.mu.Unlock()
	}
}

// received is called for every MQTT packet the agent reads.
func (a *Agent) received(c *conn, typ, flags byte, body []byte) {
	switch typ {
	case pktConnack:
		// Byte 1 of CONNACK is the return code; 0 is accepted.
		if len(body) >= 2 && body[1] == 0 {
			a.mu.Lock()
			if acked, open := a.conns[c]; open && !acked {
				a.conns[c] = true
				a.sessions.Add(1)
			}
			a.mu.Unlock()
		}
	case pktPublish:
		a.count.received.Add(1)
		a.sim.stats.received.Add(1)
	case pktPuback:
		if a.inflight.Add(-1) < 0 {
			a.inflight.Store(0)
		}
		if a.joined.Load() {
			return
		}
		id, ok := packetID(body)
		a.mu.Lock()
		acked := ok && a.stateConn == c && id == a.stateID
		a.mu.Unlock()
		if !acked || a.joined.Swap(true) {
			return
		}
		if a.offline {
			// Known to the controller now: go offline as chosen.
			a.SetOnline(false)
		}
	}
}

func (a *Agent) addModel(m *agentModel) {
	a.mu.Lock()
	a.models = append(a.models, m)
	a.mu.Unlock()
}

func (a *Agent) dropModel(m *agentModel) {
	a.mu.Lock()
	for i, x := range a.models {
		if x == m {
			a.models = append(a.models[:i], a.models[i+1:]...)
			break
		}
	}
	a.mu.Unlock()
}

func (a *Agent) lastModel() *agentModel {
	a.mu.Lock()
	defer a.mu.Unlock()
	if n := len(a.models); n > 0 {
		return a.models[n-1]
	}
	return nil
}
