package inventory

import (
	"context"
	"fmt"
	"time"

	"github.com/edgefleet/edgefleet/controller/internal/groupcommit"
	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"golang.org/x/sync/errgroup"
)

// Defaults of the writer's queue (see WithQueue).
const (
	DefaultQueueSize = 8192
	DefaultMaxGroup  = 1024
)

// Option changes how New sets up the inventory's writer.
type Option func(*writerOptions)

type writerOptions struct {
	metrics         *metrics.Registry
	queue, maxGroup int

	resyncPub                   Publisher
	resyncStore                 HelloChecker
	resyncGrace, resyncInterval time.Duration
	resyncRate                  int
}

// options applies opts to the defaults.
func options(opts []Option) writerOptions {
	o := writerOptions{queue: DefaultQueueSize, maxGroup: DefaultMaxGroup}
	for _, fn := range opts {
		fn(&o)
	}
	if o.metrics == nil {
		o.metrics = metrics.NewRegistry()
	}
	return o
}

// WithMetrics puts the writer's queue depth, commit counts and commit
// latency on m.
func WithMetrics(m *metrics.Registry) Option {
	return func(o *writerOptions) { o.metrics = m }
}

// WithQueue bounds the messages waiting for the writer (Submit waits while
// it is full) and the messages of one transaction.
func WithQueue(size, maxGroup int) Option {
	return func(o *writerOptions) { o.queue, o.maxGroup = size, maxGroup }
}

// Update is one device message for Submit: exactly one of Hello, State,
// Presence and Event is set.
type Update struct {
	DeviceID string
	// At is when the device was seen saying it.
	At       time.Time
	Hello    *pb.Hello
	State    *pb.ReportedState
	Presence *pb.Presence
	Event    *pb.Event
	// Done, when set, runs on the writer once the message is stored (nil)
	// or could not be; only then may the caller act on it. It must not
	// block.
	Done func(error)
}

// queued is an Update as the writer stores it, or, with check set, only a
// device to check for its hello once what was queued before is stored
// (Seen).
type queued struct {
	rec   store.DeviceUpdate
	msg   Update
	kind  pb.EventKind
	check bool
}

type writer struct {
	q                                *groupcommit.Queue[queued]
	updates, skipped, groups, failed *metrics.Counter
	commitLatency                    *metrics.Histogram
}

func newWriter(o writerOptions) writer {
	m := o.metrics
	w := writer{
		q:       groupcommit.New[queued](o.queue, o.maxGroup),
		updates: m.Counter("edgefleet_controller_inventory_updates_total", "Device hellos, states, presences and events stored by the inventory's writer."),
		skipped: m.Counter("edgefleet_controller_inventory_updates_coalesced_total", "Device states and presences not written because a later message of the same group replaced them."),
		groups:  m.Counter("edgefleet_controller_inventory_commits_total", "Inventory transactions (group commits; updates_total / commits_total is the mean group)."),
		failed:  m.Counter("edgefleet_controller_inventory_commit_failures_total", "Inventory group commits that failed (their messages are retried one by one)."),
		commitLatency: m.Histogram("edgefleet_controller_inventory_commit_seconds",
			"Time of one inventory transaction, commit included.", metrics.LatencyBuckets),
	}
	m.GaugeFunc("edgefleet_controller_inventory_queue_depth", "Device messages received and waiting for the inventory's writer.", func() float64 { return float64(w.q.Len()) })
	return w
}

// Submit checks and converts a device message and queues it for the
// writer (Run); it waits while the queue is full, until ctx ends. An error
// means the message was not queued.
func (inv *Inventory) Submit(ctx context.Context, u Update) error {
	q := queued{msg: u, rec: store.DeviceUpdate{ID: u.DeviceID, At: u.At}}
	switch {
	case u.Hello != nil:
		h, err := helloRecord(u.DeviceID, u.At, u.Hello)
		if err != nil {
			return err
		}
		q.rec.Hello = &h
	case u.State != nil:
		r, err := ReportFrom(u.State)
		if err != nil {
			return fmt.Errorf("state of %s: %w", u.DeviceID, err)
		}
		q.rec.Report = &r
	case u.Presence != nil:
		online := u.Presence.GetOnline()
		q.rec.Online = &online
	case u.Event != nil:
		ev := EventFrom(u.DeviceID, u.Event, u.At)
		q.rec.Event, q.kind = &ev, u.Event.GetKind()
	default:
		return fmt.Errorf("device %s: an update without a message", u.DeviceID)
	}
	return inv.w.q.Put(ctx, q)
}

// Run is the writer: it stores what Submit queued, a group per
// transaction, until ctx ends, and then what is still queued, so the
// messages the link handed over before it stopped are not lost.
func (inv *Inventory) Run(ctx context.Context) error {
	// ctx says when to stop taking messages; a group already taken is
	// committed regardless (busy_timeout bounds the wait), since its
	// messages left the broker's hands.
	store := context.WithoutCancel(ctx)
	g, gctx := errgroup.WithContext(ctx)
	// The resyncer asks devices without a stored hello for one; what it
	// has not sent when ctx ends, the devices' next messages bring back.
	g.Go(func() error { return inv.rs.run(gctx) })
	g.Go(func() error {
		err := inv.w.q.Run(ctx, func(g []queued) { inv.commit(store, g) })
		// The controller stops the writer after the link: nothing new comes.
		inv.w.q.Drain(func(g []queued) { inv.commit(store, g) })
		return err
	})
	return g.Wait()
}

func (inv *Inventory) commit(ctx context.Context, group []queued) {
	recs := make([]store.DeviceUpdate, 0, len(group))
	for i := range group {
		if !group[i].check {
			recs = append(recs, group[i].rec)
		}
	}
	var res []store.DeviceUpdateResult
	var err error
	if len(recs) > 0 {
		start := time.Now()
		res, err = inv.store.ApplyDeviceUpdates(ctx, recs)
		inv.w.commitLatency.Observe(time.Since(start).Seconds())
		inv.w.groups.Inc()
	}
	if err != nil {
		inv.w.failed.Inc()
		if len(group) > 1 {
			// One message the store refuses must not take the rest of
			// its group with it.
			inv.log.Warn("inventory group commit failed; storing its messages one by one", "messages", len(group), "err", err)
			for i := range group {
				inv.commit(ctx, group[i:i+1])
			}
			return
		}
		for _, q := range group {
			if q.check {
				continue // nothing of it was to store
			}
			err := fmt.Errorf("device %s: %w", q.rec.ID, err)
			inv.log.Error("store device message", "device", q.rec.ID, "err", err)
			if q.msg.Done != nil {
				q.msg.Done(err)
			}
		}
		return
	}
	// Stored: now, and only now, act on each message, in arrival order.
	// Devices that talk without a stored hello are checked after the
	// group, so a hello earlier in it counts.
	var talked []string
	j := 0 // index in recs and res
	for i := range group {
		q := &group[i]
		if q.check {
			talked = append(talked, q.rec.ID)
			continue
		}
		r := res[j]
		j++
		inv.w.updates.Inc()
		if r.Skipped {
			inv.w.skipped.Inc()
		}
		switch {
		case q.msg.Hello != nil:
			inv.rs.helloStored(q.rec.ID)
			inv.logHello(q.rec.ID, q.msg.Hello)
			if err := inv.republishIfBehind(ctx, q.rec.ID, q.msg.Hello, r.DesiredGeneration); err != nil {
				// The hello is stored; the device is re-sent its state at
				// its next hello, or when the broker reconnects.
				inv.log.Error("re-publish desired state", "device", q.rec.ID, "err", err)
			}
		case q.msg.Presence != nil:
			inv.log.Debug("device presence", "device", q.rec.ID, "online", *q.rec.Online)
			if *q.rec.Online { // a last will asks nothing: nobody would answer
				talked = append(talked, q.rec.ID)
			}
		case q.msg.Event != nil:
			inv.logEvent(ctx, q.rec.Event, q.kind)
			talked = append(talked, q.rec.ID)
		default: // a state
			talked = append(talked, q.rec.ID)
		}
		if q.msg.Done != nil {
			q.msg.Done(nil)
		}
	}
	inv.rs.notice(talked)
}
