package inventory

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// A hello can be lost: with a thousand agents connecting to Mosquitto in
// one second, the broker dropped hellos the controller acked too slowly,
// and those devices went on sending states and telemetry the controller
// could not place (no labels, so no rollout selected them; no platform; no
// key chain sent at their hello). The agent already answers the resync
// command by saying hello again, with its state, and re-sending its spool;
// the resyncer sends it to a device that talks without the controller
// having its hello.
//
// A device is asked only after a grace period in which its hello did not
// come: an agent publishes its presence before its hello (and may send an
// event or telemetry in between), so a new device is briefly without one.
// It never storms: a device is asked at most once per interval (a state or
// telemetry from a device already asked costs nothing more), and all
// devices together at most rate times a second; those over the rate wait
// their turn in order. The check reads the store only for a device not yet
// known to have said hello, once after its first message following a
// start, so a controller restarted with its data intact asks nobody.

// ResyncCommand is the agent command that makes it send its hello, state
// and spool again (pb.Command.Name).
const ResyncCommand = "resync"

// Defaults of WithResyncLimits.
const (
	DefaultResyncGrace    = 10 * time.Second
	DefaultResyncInterval = 5 * time.Minute
	DefaultResyncRate     = 100
)

// Publisher sends a message to the broker without waiting for it.
type Publisher interface {
	// PublishAsync publishes with QoS 1 and calls done with the outcome.
	PublishAsync(topic string, payload []byte, retained bool, done func(error))
}

// HelloChecker tells the devices whose hello the store lacks
// (store.Store.WithoutHello).
type HelloChecker interface {
	WithoutHello(ctx context.Context, ids []string) ([]string, error)
}

// WithResync makes the inventory send the resync command through pub to a
// device that sends a state, an online presence, an event or telemetry
// (see Seen) while the store, read through st, has no hello of it, within
// the limits of WithResyncLimits.
func WithResync(pub Publisher, st HelloChecker) Option {
	return func(o *writerOptions) { o.resyncPub, o.resyncStore = pub, st }
}

// WithResyncLimits sets how long a device may go without a hello before
// it is asked (grace), how long before it is asked again (interval), and
// how many devices are asked a second in all (rate). Zero takes the
// default.
func WithResyncLimits(grace, interval time.Duration, rate int) Option {
	return func(o *writerOptions) { o.resyncGrace, o.resyncInterval, o.resyncRate = grace, interval, rate }
}

// resyncer decides which devices to ask for their hello, and asks them.
// Its state is guarded by mu: the writer and the link's worker notice
// devices, Run asks them.
type resyncer struct {
	pub      Publisher // nil: resync is off
	st       HelloChecker
	grace    time.Duration
	interval time.Duration
	rate     float64
	now      func() time.Time
	log      *slog.Logger

	sent, failed *metrics.Counter

	// poke wakes run when there is something to check.
	poke chan struct{}

	mu sync.Mutex
	// known: devices whose hello is stored.
	known map[string]bool
	// checking: devices noticed and queued for a check (Seen's guard
	// against queueing one device's check per telemetry batch).
	checking map[string]bool
	// noticed: devices to check against the store, in order.
	noticed []string
	// asked: when each device was last sent the command; pending:
	// devices waiting for their grace to end and then for the rate, in
	// order (in asked too, at the time they were queued, so they are not
	// queued twice).
	asked   map[string]time.Time
	pending []pendingResync
	// tokens of the rate, refilled by the time since filled.
	tokens float64
	filled time.Time
	pruned time.Time
}

type pendingResync struct {
	id  string
	due time.Time // the grace ends
}

func newResyncer(o writerOptions, m *metrics.Registry, log *slog.Logger) *resyncer {
	r := &resyncer{
		pub: o.resyncPub, st: o.resyncStore,
		grace: o.resyncGrace, interval: o.resyncInterval, rate: float64(o.resyncRate),
		now: time.Now, log: log,
		poke:  make(chan struct{}, 1),
		known: map[string]bool{}, checking: map[string]bool{}, asked: map[string]time.Time{},
	}
	if r.grace <= 0 {
		r.grace = DefaultResyncGrace
	}
	if r.interval <= 0 {
		r.interval = DefaultResyncInterval
	}
	if r.rate <= 0 {
		r.rate = DefaultResyncRate
	}
	r.tokens = r.rate
	r.sent = m.Counter("edgefleet_controller_resyncs_total", "Resync commands sent to devices that talked without the controller having their hello.")
	r.failed = m.Counter("edgefleet_controller_resync_failures_total", "Resync commands the broker did not take.")
	m.GaugeFunc("edgefleet_controller_resyncs_pending", "Devices without a stored hello waiting to be sent the resync command (grace period, then rate).", func() float64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		return float64(len(r.pending))
	})
	return r
}

func (r *resyncer) on() bool { return r.pub != nil && r.st != nil }

// helloStored records that device id's hello is in the store.
func (r *resyncer) helloStored(id string) {
	if !r.on() {
		return
	}
	r.mu.Lock()
	r.known[id] = true
	delete(r.checking, id)
	r.mu.Unlock()
}

// needsCheck reports whether a message of device id could lead to a
// command: its hello is not known to be stored and it was not asked
// within the interval. Callers hold mu.
func (r *resyncer) needsCheck(id string, now time.Time) bool {
	if r.known[id] {
		return false
	}
	last, ok := r.asked[id]
	return !ok || now.Sub(last) >= r.interval
}

// notice queues devices whose messages are stored, for run to check.
func (r *resyncer) notice(ids []string) {
	if !r.on() || len(ids) == 0 {
		return
	}
	now := r.now()
	r.mu.Lock()
	n := len(r.noticed)
	for _, id := range ids {
		delete(r.checking, id)
		if r.needsCheck(id, now) {
			r.noticed = append(r.noticed, id)
		}
	}
	more := len(r.noticed) > n
	r.mu.Unlock()
	if more {
		select {
		case r.poke <- struct{}{}:
		default:
		}
	}
}

// run checks noticed devices and sends commands at the rate until ctx
// ends.
func (r *resyncer) run(ctx context.Context) error {
	if !r.on() {
		<-ctx.Done()
		return nil
	}
	var timer <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.poke:
		case <-timer:
		}
		r.check(ctx)
		wait := r.send()
		timer = nil
		if wait > 0 {
			timer = time.After(wait)
		}
	}
}

// check reads the store for the noticed devices and queues those without
// a hello, due once their grace ends.
func (r *resyncer) check(ctx context.Context) {
	now := r.now()
	r.mu.Lock()
	var ids []string
	seen := make(map[string]bool, len(r.noticed))
	for _, id := range r.noticed {
		if !seen[id] && r.needsCheck(id, now) {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	r.noticed = r.noticed[:0]
	r.mu.Unlock()
	if len(ids) == 0 {
		return
	}
	missing, err := r.st.WithoutHello(ctx, ids)
	if err != nil {
		// The devices are noticed again at their next message.
		r.log.Warn("resync: check devices for their hello", "devices", len(ids), "err", err)
		return
	}
	lacks := make(map[string]bool, len(missing))
	for _, id := range missing {
		lacks[id] = true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		switch {
		case !lacks[id]:
			r.known[id] = true
		case r.needsCheck(id, now): // not queued or stored meanwhile
			r.asked[id] = now
			r.pending = append(r.pending, pendingResync{id: id, due: now.Add(r.grace)})
		}
	}
}

// send sends the command to the pending devices whose grace is over and
// that still have no hello (one stored since marks them known), as the
// rate allows, and returns how long to wait for the next one due or the
// next token (0: nothing pending).
func (r *resyncer) send() time.Duration {
	now := r.now()
	r.mu.Lock()
	if !r.filled.IsZero() {
		r.tokens = min(r.rate, r.tokens+now.Sub(r.filled).Seconds()*r.rate)
	}
	r.filled = now
	var out []string
	var wait time.Duration
	for len(r.pending) > 0 {
		p := r.pending[0]
		if r.known[p.id] {
			r.pending = r.pending[1:] // said hello while it waited
			continue
		}
		if p.due.After(now) {
			wait = p.due.Sub(now) // queued in time order: the rest later
			break
		}
		if r.tokens < 1 {
			wait = max(time.Duration((1-r.tokens)/r.rate*float64(time.Second)), time.Millisecond)
			break
		}
		r.pending = r.pending[1:]
		r.tokens--
		r.asked[p.id] = now
		out = append(out, p.id)
	}
	if len(r.pending) == 0 {
		r.pending = nil // let the backing array go
	}
	r.prune(now)
	r.mu.Unlock()
	for _, id := range out {
		r.ask(id, now)
	}
	return wait
}

// prune forgets devices asked more than an interval ago, once per
// interval, so asked does not grow with every device ever seen. Callers
// hold mu.
func (r *resyncer) prune(now time.Time) {
	if now.Sub(r.pruned) < r.interval {
		return
	}
	r.pruned = now
	waiting := make(map[string]bool, len(r.pending))
	for _, p := range r.pending {
		waiting[p.id] = true
	}
	for id, at := range r.asked {
		if now.Sub(at) >= r.interval && !waiting[id] {
			delete(r.asked, id)
		}
	}
}

// ask publishes the resync command to device id.
func (r *resyncer) ask(id string, now time.Time) {
	b, err := wire.Seal(id, now, &pb.Command{Id: fmt.Sprintf("resync-%d", now.UnixMilli()), Name: ResyncCommand})
	if err != nil {
		r.failed.Inc()
		r.log.Error("resync: seal command", "device", id, "err", err)
		return
	}
	r.log.Info("device talks without a stored hello; asking it to resync", "device", id)
	r.pub.PublishAsync(wire.Topic(id, wire.KindCmd), b, false, func(err error) {
		if err != nil {
			r.failed.Inc()
			r.log.Warn("resync command not published; the device is asked again after the interval", "device", id, "err", err)
			return
		}
		r.sent.Inc()
	})
}

// Seen tells the inventory that device id sent a message it does not
// store itself (telemetry), so a device without a stored hello is asked
// for one like one sending states. The check is queued behind the
// messages submitted before (a hello among them counts); most calls return
// at once. It waits, as Submit does, while the writer's queue is full.
func (inv *Inventory) Seen(ctx context.Context, id string) error {
	r := inv.rs
	if !r.on() {
		return nil
	}
	now := r.now()
	r.mu.Lock()
	skip := r.checking[id] || !r.needsCheck(id, now)
	if !skip {
		r.checking[id] = true
	}
	r.mu.Unlock()
	if skip {
		return nil
	}
	if err := inv.w.q.Put(ctx, queued{rec: store.DeviceUpdate{ID: id}, check: true}); err != nil {
		r.mu.Lock()
		delete(r.checking, id)
		r.mu.Unlock()
		return err
	}
	return nil
}
