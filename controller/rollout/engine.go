package rollout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
)

// Sentinel errors callers branch on (the API maps them to statuses).
var (
	// ErrNotFound is wrapped when the rollout or its model is unknown.
	ErrNotFound = errors.New("not found")
	// ErrConflict is wrapped when a rollout would fight another one over
	// the same slot of the same devices, or its name is taken.
	ErrConflict = errors.New("conflict")
	// ErrState is wrapped when an operator action does not apply to the
	// rollout's phase (approve a rollout that waits for nothing, ...).
	ErrState = errors.New("not possible now")
	// ErrStopped is returned when the engine is not running.
	ErrStopped = errors.New("rollout engine is not running")
)

// Store is what the engine needs from the controller's store.
type Store interface {
	CommitRollout(ctx context.Context, c store.RolloutCommit, build store.BuildFunc) ([]store.Desired, error)
	Rollout(ctx context.Context, id string) (store.Rollout, error)
	Rollouts(ctx context.Context, openOnly bool) ([]store.Rollout, error)
	RolloutWaves(ctx context.Context, id string) ([]store.RolloutWave, error)
	SetWaveDecision(ctx context.Context, id string, idx int, after time.Duration) error
	RolloutDevices(ctx context.Context, id string) ([]store.RolloutDevice, error)
	RolloutView(ctx context.Context, id string, historyLimit int) (store.RolloutView, error)
	DeviceBriefs(ctx context.Context, slot string, ids []string) ([]store.DeviceBrief, error)
	EventsAfter(ctx context.Context, after int64, rolloutIDs []string, limit int) ([]store.StoredEvent, error)
	LastEventID(ctx context.Context) (int64, error)
	Model(ctx context.Context, name, version string) (store.Model, error)
	Telemetry
}

// Issuer commits desired states and publishes them; *director.Director is
// one. commit runs under the issuer's publish lock and must store what it
// issues in one transaction.
type Issuer interface {
	Issue(ctx context.Context, commit func(build store.BuildFunc) ([]store.Desired, error)) ([]store.Desired, error)
}

// Options configure an Engine.
type Options struct {
	Store  Store
	Issuer Issuer
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Gates adds gate types, or replaces built-in ones, by name.
	Gates map[string]GateFactory
	// Shadow and Drift feed the built-in shadowAgreement and drift gates;
	// without Drift that gate is inconclusive, without Shadow the
	// shadowAgreement gate reads the shadow figures the devices report
	// (shadow.go).
	Shadow ShadowSource
	Drift  DriftSource
	// GateInterval is how often gates are checked while a wave soaks
	// (default 10s); they are always checked when the wave ends.
	GateInterval time.Duration
	// BaselineWindow is how far before a wave the latency gate's fallback
	// baseline (the wave's own devices before they updated, used only
	// when no device outside the wave ran the previous version in the
	// same minutes) may reach (default 1h).
	BaselineWindow time.Duration
	// RestartGrace is the least time a device gets after the controller
	// starts before its deadline counts: while the controller was down the
	// device could not report, and every device is offline until it has
	// reconnected (default 1m, never more than the rollout's deadline).
	RestartGrace time.Duration
	// MaxSleep bounds the engine's sleep between checks (default 5s).
	MaxSleep time.Duration
	// NotifyBatch bounds the desired states issued by the commit that
	// starts a wave (default 500), and 20 times as many by each commit
	// after it. A larger wave is notified over several commits in a row:
	// the decision to start it, with its first devices, is stored and
	// published without waiting for the rest.
	NotifyBatch int
	// Metrics, if set, receives the wave decision latency histogram.
	Metrics *metrics.Registry
}

// Engine runs the rollouts. Its Run owns every rollout in progress: one
// goroutine decides, so no two decisions race, and the API's actions are
// queued to it. Reads (Status, List, Devices) go to the store, where every
// decision is committed before it is acted on.
type Engine struct {
	o     Options
	log   *slog.Logger
	gates map[string]GateFactory

	cmds    chan command
	wake    chan struct{}
	started chan struct{}
	stopped chan struct{}
	stopMu  sync.Once

	dirtyMu sync.Mutex
	// dirty holds the devices with news not yet applied, each with the
	// earliest time the controller received any of it (zero: unknown).
	dirty map[string]time.Time
	// decisionLatency observes each wave decision (see decision).
	decisionLatency *metrics.Histogram

	bc broadcaster

	// The rest belongs to Run's goroutine.
	runs     map[string]*run
	byDevice map[string][]*run
	obs      map[string]*observation
	cursor   int64
}

type command struct {
	fn   func(ctx context.Context)
	done chan struct{}
}

// New returns an engine; Run starts it.
func New(o Options) (*Engine, error) {
	if o.Store == nil || o.Issuer == nil {
		return nil, errors.New("rollout: Store and Issuer are required")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.GateInterval <= 0 {
		o.GateInterval = 10 * time.Second
	}
	if o.BaselineWindow <= 0 {
		o.BaselineWindow = time.Hour
	}
	if o.RestartGrace <= 0 {
		o.RestartGrace = time.Minute
	}
	if o.MaxSleep <= 0 {
		o.MaxSleep = 5 * time.Second
	}
	if o.NotifyBatch <= 0 {
		o.NotifyBatch = 500
	}
	e := &Engine{
		o:        o,
		log:      o.Logger,
		gates:    map[string]GateFactory{},
		cmds:     make(chan command),
		wake:     make(chan struct{}, 1),
		started:  make(chan struct{}),
		stopped:  make(chan struct{}),
		dirty:    map[string]time.Time{},
		bc:       broadcaster{subs: map[string]map[chan struct{}]struct{}{}},
		runs:     map[string]*run{},
		byDevice: map[string][]*run{},
		obs:      map[string]*observation{},
	}
	if o.Metrics != nil {
		e.decisionLatency = o.Metrics.Histogram("edgefleet_controller_rollout_wave_decision_seconds",
			"Time from receiving the report that finished a wave's last device (or its deadline or soak end) to the next wave's start, or the rollout's end, being stored and its first desired states published.",
			metrics.LatencyBuckets)
	}
	for name, f := range builtinGates {
		e.gates[name] = f
	}
	e.gates[GateShadowAgreement] = func(s GateSpec) (Gate, error) {
		return &ShadowAgreementGate{Min: s.Min, MinInferences: s.MinInferences, Source: e.shadowSource()}, nil
	}
	e.gates[GateDrift] = func(s GateSpec) (Gate, error) {
		return &DriftGate{Max: s.Max, MinInferences: s.MinInferences, Source: o.Drift}, nil
	}
	for name, f := range o.Gates {
		e.gates[name] = f
	}
	return e, nil
}

// KnownGate reports whether the engine has a gate type.
func (e *Engine) KnownGate(t string) bool {
	_, ok := e.gates[t]
	return ok
}

// DeviceChanged tells the engine that something a device reported was
// stored, without saying when it came in; DeviceReported is preferred.
func (e *Engine) DeviceChanged(id string) { e.DeviceReported(id, time.Time{}) }

// DeviceReported tells the engine that a report the controller received
// at received was stored for device id. The time dates the news: a wave's
// decision latency counts from the report that finished it.
func (e *Engine) DeviceReported(id string, received time.Time) {
	e.dirtyMu.Lock()
	e.markDirtyLocked(id, received)
	e.dirtyMu.Unlock()
	e.poke()
}

// markDirtyLocked adds id to the dirty set, keeping the earliest known
// receive time; dirtyMu is held.
func (e *Engine) markDirtyLocked(id string, received time.Time) {
	if at, ok := e.dirty[id]; !ok || at.IsZero() || (!received.IsZero() && received.Before(at)) {
		e.dirty[id] = received
	}
}

func (e *Engine) poke() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// do runs fn on Run's goroutine and waits for it.
func (e *Engine) do(ctx context.Context, fn func(ctx context.Context)) error {
	c := command{fn: fn, done: make(chan struct{})}
	select {
	case e.cmds <- c:
	case <-e.stopped:
		return ErrStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run loads the open rollouts and drives them until ctx ends.
func (e *Engine) Run(ctx context.Context) error {
	defer e.stopMu.Do(func() { close(e.stopped) })
	if err := e.load(ctx); err != nil {
		return fmt.Errorf("load rollouts: %w", err)
	}
	close(e.started)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		e.processDirty(ctx)
		now := e.o.Now()
		next := now.Add(e.o.MaxSleep)
		for _, r := range e.sortedRuns() {
			if r.touched || !now.Before(r.wakeAt) {
				e.step(ctx, r, now)
			}
			if _, ok := e.runs[r.ro.ID]; ok && r.wakeAt.Before(next) {
				next = r.wakeAt
			}
		}
		timer.Reset(max(time.Millisecond, next.Sub(e.o.Now())))
		select {
		case <-ctx.Done():
			return nil
		case c := <-e.cmds:
			c.fn(ctx)
			close(c.done)
		case <-e.wake:
		case <-timer.C:
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
	}
}

// Started is closed once Run has loaded the open rollouts.
func (e *Engine) Started() <-chan struct{} { return e.started }

// step advances one rollout and commits what changed.
func (e *Engine) step(ctx context.Context, r *run, now time.Time) {
	r.touched, r.more = false, false
	e.advance(ctx, r, now)
	decisions, more, issued := r.decisions, r.more, len(r.desired)
	if err := e.commit(ctx, r, now, false); err != nil {
		if ctx.Err() == nil {
			e.log.Error("rollout decision not committed; retrying", "rollout", r.ro.ID, "err", err)
			r.wakeAt = now.Add(time.Second)
		}
		return
	}
	e.reportDecisions(ctx, r, decisions, issued)
	r.wakeAt = e.wakeAfter(r, now, more)
}

// wakeAfter is when r next needs a look after a commit at now: right
// away when notify left devices of the running wave for the next commit
// (more), else nextWake.
func (e *Engine) wakeAfter(r *run, now time.Time, more bool) time.Time {
	if more {
		return now
	}
	return e.nextWake(r, now)
}

// reportDecisions records each wave decision of a committed step with its
// latency (store, metric, log): from the news that finished the wave to
// now, when the next wave's start (or the rollout's end) is stored and
// its first desired states are published.
func (e *Engine) reportDecisions(ctx context.Context, r *run, ds []decision, issued int) {
	for _, d := range ds {
		after := max(0, e.o.Now().Sub(d.evidence))
		if e.decisionLatency != nil {
			e.decisionLatency.Observe(after.Seconds())
		}
		if err := e.o.Store.SetWaveDecision(ctx, r.ro.ID, d.wave, after); err != nil {
			e.log.Warn("record wave decision latency", "rollout", r.ro.ID, "wave", d.wave+1, "err", err)
		}
		next := "rollout " + r.ro.Phase
		if d.wave+1 < len(r.waves) {
			next = fmt.Sprintf("wave %d %s", d.wave+2, r.waves[d.wave+1].state)
		}
		e.log.Info("rollout wave decided", "rollout", r.ro.ID, "wave", d.wave+1, "next", next,
			"decision_ms", after.Milliseconds(), "issued", issued)
	}
}

func (e *Engine) sortedRuns() []*run {
	out := make([]*run, 0, len(e.runs))
	for _, r := range e.runs {
		out = append(out, r)
	}
	// Oldest first, so a rollout created earlier decides earlier.
	for i := 1; i < len(out); i++ {
		for j := i; j > 0 && out[j].ro.CreatedAt.Before(out[j-1].ro.CreatedAt); j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}

// load reads the open rollouts, the state of their devices, and replays
// their events, so every step continues from what is stored.
func (e *Engine) load(ctx context.Context) error {
	cursor, err := e.o.Store.LastEventID(ctx)
	if err != nil {
		return err
	}
	ros, err := e.o.Store.Rollouts(ctx, true)
	if err != nil {
		return err
	}
	now := e.o.Now()
	var ids []string
	for _, ro := range ros {
		r, err := e.loadRun(ctx, ro)
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			// One rollout this controller cannot read (a gate type it does
			// not have, after a downgrade) must not stop the others.
			e.log.Error("cannot resume rollout; it stays as stored", "rollout", ro.ID, "err", err)
			continue
		}
		e.track(r)
		ids = append(ids, r.ro.ID)
		// Grace after a restart: nobody could report while the controller
		// was down.
		grace := min(e.o.RestartGrace, r.spec.Strategy.Deadline.D())
		for _, d := range r.devs {
			if !d.step.Terminal() && d.step != StepPending && d.rec.Deadline.Before(now.Add(grace)) {
				d.rec.Deadline = now.Add(grace)
			}
		}
		e.log.Info("resuming rollout", "rollout", r.ro.ID, "phase", r.ro.Phase, "wave", r.ro.Wave, "devices", len(r.devs))
	}
	if err := e.refreshObs(ctx, e.trackedDevices()); err != nil {
		return err
	}
	// Replay the events of the open rollouts up to the cursor; events
	// after it come through processDirty.
	var after int64
	for done := false; !done; {
		evs, err := e.o.Store.EventsAfter(ctx, after, ids, 1000)
		if err != nil {
			return err
		}
		done = len(evs) < 1000
		for _, ev := range evs {
			if ev.ID > cursor {
				done = true
				break
			}
			e.applyEvent(ev, now)
			after = ev.ID
		}
	}
	e.cursor = cursor
	for _, r := range e.runs {
		for _, d := range r.devs {
			e.applyObs(r, d, now)
		}
		r.touched = true
	}
	return nil
}

func (e *Engine) loadRun(ctx context.Context, ro store.Rollout) (*run, error) {
	spec, err := ParseSpecKnown(ro.Spec, e.KnownGate)
	if err != nil {
		return nil, fmt.Errorf("rollout %s: stored specification: %w", ro.ID, err)
	}
	waves, err := e.o.Store.RolloutWaves(ctx, ro.ID)
	if err != nil {
		return nil, err
	}
	devs, err := e.o.Store.RolloutDevices(ctx, ro.ID)
	if err != nil {
		return nil, err
	}
	m, err := e.o.Store.Model(ctx, ro.Model, ro.Version)
	if err != nil {
		return nil, fmt.Errorf("rollout %s: model: %w", ro.ID, err)
	}
	r := newRun(ro, spec, m)
	for _, w := range waves {
		r.waves = append(r.waves, &wave{rec: w, state: WaveState(w.State)})
	}
	for _, rec := range devs {
		st, err := ParseStep(rec.Step)
		if err != nil {
			return nil, fmt.Errorf("rollout %s device %s: %w", ro.ID, rec.DeviceID, err)
		}
		r.add(&dev{rec: rec, step: st})
	}
	return r, nil
}

func (e *Engine) track(r *run) {
	e.runs[r.ro.ID] = r
	for _, d := range r.devs {
		e.byDevice[d.rec.DeviceID] = append(e.byDevice[d.rec.DeviceID], r)
	}
}

func (e *Engine) trackDevice(r *run, d *dev) {
	e.byDevice[d.rec.DeviceID] = append(e.byDevice[d.rec.DeviceID], r)
}

func (e *Engine) untrack(r *run) {
	delete(e.runs, r.ro.ID)
	for _, d := range r.devs {
		id := d.rec.DeviceID
		rs := e.byDevice[id]
		for i, x := range rs {
			if x == r {
				rs = append(rs[:i], rs[i+1:]...)
				break
			}
		}
		if len(rs) == 0 {
			delete(e.byDevice, id)
			delete(e.obs, id)
		} else {
			e.byDevice[id] = rs
		}
	}
}

func (e *Engine) trackedDevices() []string {
	ids := make([]string, 0, len(e.byDevice))
	for id := range e.byDevice {
		ids = append(ids, id)
	}
	return ids
}

// refreshObs re-reads what the devices in ids reported.
func (e *Engine) refreshObs(ctx context.Context, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	briefs, err := e.o.Store.DeviceBriefs(ctx, "", ids)
	if err != nil {
		return err
	}
	for _, b := range briefs {
		e.obs[b.ID] = observe(b, e.obs[b.ID], e.o.Now())
	}
	return nil
}

// processDirty applies what devices reported since the last pass: their
// stored state and presence, and the new events.
func (e *Engine) processDirty(ctx context.Context) {
	e.dirtyMu.Lock()
	dirty := e.dirty
	e.dirty = map[string]time.Time{}
	e.dirtyMu.Unlock()
	if len(dirty) == 0 {
		return
	}
	now := e.o.Now()
	// The steps before the news, to date the devices it moves (dev.news).
	before := map[*dev]Step{}
	var ids []string
	for id := range dirty {
		if len(e.byDevice[id]) == 0 {
			continue
		}
		ids = append(ids, id)
		for _, r := range e.byDevice[id] {
			if d := r.byID[id]; d != nil {
				before[d] = d.step
			}
		}
	}
	defer func() {
		for d, step := range before {
			if d.step != step {
				d.news = now
				if at := dirty[d.rec.DeviceID]; !at.IsZero() && at.Before(now) {
					d.news = at
				}
			}
		}
	}()
	if len(ids) > 0 {
		if err := e.refreshObs(ctx, ids); err != nil {
			e.log.Error("read device states for rollouts", "devices", len(ids), "err", err)
			e.dirtyMu.Lock()
			for _, id := range ids {
				e.markDirtyLocked(id, dirty[id])
			}
			e.dirtyMu.Unlock()
		}
		for _, id := range ids {
			for _, r := range e.byDevice[id] {
				if d := r.byID[id]; d != nil {
					e.applyObs(r, d, now)
				}
			}
		}
	}
	for {
		evs, err := e.o.Store.EventsAfter(ctx, e.cursor, nil, 1000)
		if err != nil {
			e.log.Error("read device events for rollouts", "err", err)
			return
		}
		for _, ev := range evs {
			e.applyEvent(ev, now)
			e.cursor = ev.ID
		}
		if len(evs) < 1000 {
			return
		}
	}
}

// commit writes what advance changed in one transaction, issuing the
// desired states it decided, then publishes them. If the commit fails the
// rollout is read back from the store, as if the decision never happened.
func (e *Engine) commit(ctx context.Context, r *run, now time.Time, create bool) error {
	if !create && !r.changed() {
		return nil
	}
	c := r.commit(now, create)
	docs, err := e.o.Issuer.Issue(ctx, func(build store.BuildFunc) ([]store.Desired, error) {
		return e.o.Store.CommitRollout(ctx, c, build)
	})
	if err != nil {
		if !create {
			if rerr := e.reload(ctx, r.ro.ID); rerr != nil {
				e.log.Error("reload rollout after a failed commit", "rollout", r.ro.ID, "err", rerr)
			}
		}
		return err
	}
	r.committed(c)
	for _, h := range c.History {
		e.log.Info("rollout: "+h, "rollout", r.ro.ID)
	}
	for _, doc := range docs {
		if d := r.byID[doc.DeviceID]; d != nil {
			d.rec.Generation = doc.Generation
		}
	}
	if len(docs) > 0 {
		e.log.Debug("rollout issued desired states", "rollout", r.ro.ID, "devices", len(docs), "phase", r.ro.Phase, "wave", r.ro.Wave)
	}
	if !r.ro.Open {
		e.untrack(r)
	}
	e.bc.notify(r.ro.ID)
	return nil
}

func (e *Engine) reload(ctx context.Context, id string) error {
	old := e.runs[id]
	if old != nil {
		e.untrack(old)
	}
	ro, err := e.o.Store.Rollout(ctx, id)
	if err != nil {
		return err
	}
	if !ro.Open {
		return nil
	}
	r, err := e.loadRun(ctx, ro)
	if err != nil {
		return err
	}
	e.track(r)
	if err := e.refreshObs(ctx, r.ids()); err != nil {
		return err
	}
	r.touched = true
	return nil
}

// nextWake is when r next needs a look without any news: a deadline, the
// end of a soak, a gate check.
func (e *Engine) nextWake(r *run, now time.Time) time.Time {
	next := now.Add(e.o.MaxSleep)
	for _, d := range r.devs {
		if d.step.Terminal() || d.step == StepPending {
			continue
		}
		if !d.rec.Deadline.IsZero() && d.rec.Deadline.Before(next) {
			next = d.rec.Deadline
		}
		if d.step == StepActivated {
			if end := d.rec.ActivatedAt.Add(r.soak(d.rec.Wave)); end.After(now) && end.Before(next) {
				next = end
			}
		}
	}
	if r.ro.Wave < len(r.waves) && r.waves[r.ro.Wave].state == WaveRunning {
		if g := r.lastGate.Add(e.o.GateInterval); g.Before(next) {
			next = g
		}
		if r.settling && r.settleNext.Before(next) {
			next = r.settleNext
		}
	}
	return next
}

// broadcaster tells watchers that a rollout changed.
type broadcaster struct {
	mu   sync.Mutex
	subs map[string]map[chan struct{}]struct{}
}

func (b *broadcaster) subscribe(id string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	b.mu.Lock()
	if b.subs[id] == nil {
		b.subs[id] = map[chan struct{}]struct{}{}
	}
	b.subs[id][ch] = struct{}{}
	b.mu.Unlock()
	return ch, func() {
		b.mu.Lock()
		delete(b.subs[id], ch)
		if len(b.subs[id]) == 0 {
			delete(b.subs, id)
		}
		b.mu.Unlock()
	}
}

func (b *broadcaster) notify(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, key := range []string{id, ""} {
		for ch := range b.subs[key] {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}
}

// Subscribe returns a channel that receives a signal (coalesced) whenever
// rollout id changes, or any rollout with id "". Call cancel when done.
func (e *Engine) Subscribe(id string) (<-chan struct{}, func()) { return e.bc.subscribe(id) }
