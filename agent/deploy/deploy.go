// Package deploy converges the models an agent runs to the desired state
// the controller publishes, watches every new version's health, and keeps
// serving the last good model whatever happens on the way.
//
// The activation pipeline, for each slot whose desired bundle is not the
// active one:
//
//  1. verify: download (resumable) and check the digest; the manifest must
//     name the assigned model and version; Guard checks the release
//     signature and the version floor (TrustGuard; AllowAll without keys).
//  2. compile, instantiate, golden self-test: Loader.Load (the wazero
//     host). A version already loaded in the slot (the previous one, kept
//     for rollback) skips all of it and switches at once.
//  3. optional shadow phase (the assignment's ShadowPolicy, else
//     Options.Shadow): the candidate gets a copy of live inputs beside the
//     active version, its answers compared and never returned; it is
//     switched in when they agree enough, refused when they do not. A
//     held candidate (hold) waits for the controller to order the switch;
//     its figures are reported in SlotState.shadow meanwhile.
//  4. atomic switch: state.json is written first, then the slot's active
//     model is swapped under a lock that inferences only read; calls in
//     flight finish on the old model, which is closed after them.
//  5. health watch (HealthPolicy, from the assignment or the agent's
//     defaults): errors, timeouts and latency of the new version; HEALTHY
//     once it held for the watch.
//  6. automatic local rollback: a version that breaks its bounds is
//     replaced by the previous one at once (kept loaded during the watch),
//     reported ROLLED_BACK with the figures, and not activated again for
//     the same desired generation.
//
// Stored bundles nobody needs (not active, previous, candidate or
// desired) are deleted after each pass.
//
// A slot's states, and what moves it (health.go, slot.go):
//
//	empty    --install-->            watching   (ACTIVATED)
//	any      --install, shadow-->    shadowing  (VERIFIED, detail: shadow phase started ...)
//	shadowing --held, plain assignment--> watching (ACTIVATED, detail: switched by the controller ...)
//	shadowing --agreement ok-->      watching   (ACTIVATED, detail: the shadow figures)
//	shadowing --agreement low-->     unchanged  (FAILED, candidate refused for the generation)
//	watching --bounds held-->        healthy    (HEALTHY, SlotState.healthy = true)
//	watching --bounds broken-->      healthy on the previous version (ROLLED_BACK)
//	watching --broken, no previous-> unhealthy, still serving (FAILED)
//	any      --rollback order-->     healthy    (ACTIVATED; a known version, no watch)
//
// A desired state is checked before it is acted on (director signature
// by Guard.CheckDesired before anything is decoded, for this device,
// generation above the last accepted one, not expired and not issued in
// the future, both with Options.ClockSkew of tolerance) and written to
// DATA/desired.pb, its generation also to DATA/generation; a refused one
// is reported REFUSED. Download failures
// are retried with backoff; a bundle that downloaded correctly but does
// not decode, load or pass its checks is content-addressed, so retrying
// it cannot help: it is not retried until the agent restarts.
//
// Restore, run before the agent connects anywhere, loads the active model
// of every slot from state.json and the stored bundles, falling back to
// the previous model when the active one no longer loads, and resumes a
// health watch where it stood.
package deploy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent/fetch"
	"github.com/edgefleet/edgefleet/agent/internal/durable"
	"github.com/edgefleet/edgefleet/models/host"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// Reporter receives what the agent tells the controller. Event may block
// (it publishes); StateChanged must not (it only schedules a report).
type Reporter interface {
	Event(ctx context.Context, ev *pb.Event)
	StateChanged()
}

// Options configures a Manager. DeviceID, DataDir and Loader (or Host)
// are required.
type Options struct {
	DeviceID string
	// DataDir holds desired.pb, state.json and bundles/.
	DataDir string
	// Loader loads verified bundles. Nil means HostLoader(Host).
	Loader Loader
	// Host is used when Loader is nil.
	Host *host.Host
	// Controller is the base URL that relative bundle URLs resolve against.
	Controller string
	// HTTPClient downloads bundles; nil means one with sane timeouts.
	HTTPClient *http.Client
	Logger     *slog.Logger
	Reporter   Reporter
	// RetryMin and RetryMax bound the backoff between attempts at a
	// failed download (defaults 2s and 5m).
	RetryMin, RetryMax time.Duration
	// DownloadTimeout bounds one download attempt (default 15m).
	DownloadTimeout time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Health fills what an assignment's HealthPolicy leaves unset; its own
	// zero fields take DefaultHealthPolicy's.
	Health HealthPolicy
	// Shadow is the agent's own shadow phase for an assignment: nil (or a
	// nil answer) means none. An assignment's own ShadowPolicy wins and
	// takes only its unset fields from here. Assignments ordering a
	// rollback, and slots with nothing active, never get one.
	Shadow func(a *pb.SlotAssignment) *ShadowPolicy
	// Guard checks bundles and versions before they load; nil: AllowAll.
	Guard Guard
	// ClockSkew is how far this device's clock may be behind or ahead of
	// the controller's (default DefaultClockSkew): a desired state issued
	// more than that in the future is refused (a device clock far behind
	// must be fixed, NTP), and one is expired only when it expired more
	// than that ago.
	ClockSkew time.Duration
	// SaveInterval is how often the counts of a running health watch are
	// saved to state.json (default 5s): what a crash can lose of them.
	SaveInterval time.Duration
}

// DefaultClockSkew is the clock difference between device and controller
// that desired-state times tolerate.
const DefaultClockSkew = 5 * time.Minute

// maxOffers bounds desired states waiting to be checked. Only the newest
// matters, so dropping old ones loses nothing but their REFUSED events.
const maxOffers = 16

// maxRecentErrors is how many errors RecentErrors keeps.
const maxRecentErrors = 10

// maxLoadAttempts is how many times the agent may die while loading one
// bundle before it stops trying (see LoadingRecord).
const maxLoadAttempts = 3

// maxWatchRestarts is how many unclean starts during one health watch
// make the agent presume the watched version kills it, and roll it back.
const maxWatchRestarts = 3

// shadowQueue bounds the live calls waiting for a shadow candidate; more
// are skipped, so shadowing never slows the live path.
const shadowQueue = 64

// Manager owns the slots. Create it with New, call Restore, then Run.
type Manager struct {
	o     Options
	log   *slog.Logger
	store *fetch.Store
	base  *url.URL

	// switchMu serializes slot transitions and the state.json writes
	// that record them (reconcile and health loops). It is taken before
	// mu, and never held by an inference.
	switchMu sync.Mutex

	// mu guards slots, order, desired and errs. Inferences hold it for
	// reading only long enough to find their model.
	mu         sync.RWMutex
	slots      map[string]*slot
	order      []string // slot names, sorted
	desired    *pb.DesiredState
	desiredRaw []byte
	errs       []string
	accepted   atomic.Uint64

	offerMu    sync.Mutex
	offers     []*pb.SignedDesiredState
	passCancel context.CancelFunc
	wake       chan struct{}

	healthWake chan struct{}
	shadowQ    chan shadowJob

	// failures and loadAttempts are touched by Restore and the reconcile
	// loop only.
	failures     map[string]*failure
	loadAttempts map[string]int // by digest: loads the agent died in
	// poisoned is the loading record of a bundle refused for killing the
	// agent too often; it stays in state.json while that bundle is desired.
	poisoned *LoadingRecord
	// deferred holds events Restore decided; Run sends them.
	deferred []*pb.Event
}

type failure struct {
	digest    string
	attempts  int
	next      time.Time
	permanent bool
	// assignment marks a refusal of the assignment (the version floor),
	// not of the bytes: a new generation may order the same bundle
	// differently (a rollback), so it is retried then.
	assignment bool
}

// New checks the options and returns a Manager with no models.
func New(o Options) (*Manager, error) {
	if o.Loader == nil && o.Host != nil {
		o.Loader = HostLoader(o.Host)
	}
	if o.Loader == nil || o.DataDir == "" || o.DeviceID == "" {
		return nil, fmt.Errorf("deploy: DeviceID, DataDir and Loader (or Host) are required")
	}
	base, err := url.Parse(o.Controller)
	if err != nil {
		return nil, fmt.Errorf("deploy: controller URL %q: %w", o.Controller, err)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Reporter == nil {
		o.Reporter = nopReporter{}
	}
	if o.RetryMin <= 0 {
		o.RetryMin = 2 * time.Second
	}
	if o.RetryMax < o.RetryMin {
		o.RetryMax = max(5*time.Minute, o.RetryMin)
	}
	if o.DownloadTimeout <= 0 {
		o.DownloadTimeout = 15 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Guard == nil {
		o.Guard = AllowAll{}
	}
	if o.SaveInterval <= 0 {
		o.SaveInterval = 5 * time.Second
	}
	if o.ClockSkew <= 0 {
		o.ClockSkew = DefaultClockSkew
	}
	o.Health = PolicyFrom(nil, fillPolicy(o.Health))
	if o.HTTPClient == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = 30 * time.Second
		o.HTTPClient = &http.Client{Transport: tr}
	}
	log := o.Logger.With("device", o.DeviceID)
	return &Manager{
		o:          o,
		log:        log,
		store:      &fetch.Store{Dir: filepath.Join(o.DataDir, BundlesDir), Client: o.HTTPClient, Logger: log},
		base:       base,
		slots:      map[string]*slot{},
		wake:       make(chan struct{}, 1),
		healthWake: make(chan struct{}, 1),
		shadowQ:    make(chan shadowJob, shadowQueue),
		failures:   map[string]*failure{},

		loadAttempts: map[string]int{},
	}, nil
}

// fillPolicy gives p's zero fields DefaultHealthPolicy's values.
func fillPolicy(p HealthPolicy) HealthPolicy {
	d := DefaultHealthPolicy
	if p.Watch <= 0 {
		p.Watch = d.Watch
	}
	if !(p.MaxErrorRate > 0) {
		p.MaxErrorRate = d.MaxErrorRate
	}
	p.MaxErrorRate = min(p.MaxErrorRate, 1)
	if p.MaxLatencyP99 < 0 {
		p.MaxLatencyP99 = 0
	}
	if p.MinInferences == 0 {
		p.MinInferences = d.MinInferences
	}
	return p
}

type nopReporter struct{}

func (nopReporter) Event(context.Context, *pb.Event) {}
func (nopReporter) StateChanged()                    {}

// Offer hands a desired state received from the controller to Run. It
// never blocks. A state that will be accepted cancels the convergence in
// progress (a partial download resumes later), since it supersedes it.
func (m *Manager) Offer(sd *pb.SignedDesiredState) {
	m.offerMu.Lock()
	if len(m.offers) >= maxOffers {
		m.offers = m.offers[1:]
	}
	m.offers = append(m.offers, sd)
	if ds, err := DecodeDesired(sd); err == nil && m.o.Guard.CheckDesired(sd) == nil && ds.GetDeviceId() == m.o.DeviceID &&
		ds.GetGeneration() > m.accepted.Load() && m.passCancel != nil {
		m.passCancel()
	}
	m.offerMu.Unlock()
	m.poke()
}

func (m *Manager) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *Manager) pokeHealth() {
	select {
	case m.healthWake <- struct{}{}:
	default:
	}
}

// Generation returns the generation of the last accepted desired state.
func (m *Manager) Generation() uint64 { return m.accepted.Load() }

// Run checks offered desired states and converges to the accepted one,
// watches new versions' health and runs shadow candidates, until ctx
// ends. It returns nil then; models stay loaded until Close.
func (m *Manager) Run(ctx context.Context) error {
	for _, ev := range m.deferred {
		m.o.Reporter.Event(ctx, ev)
	}
	m.deferred = nil
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return m.reconcileLoop(gctx) })
	g.Go(func() error { return m.healthLoop(gctx) })
	g.Go(func() error { return m.shadowLoop(gctx) })
	return g.Wait()
}

func (m *Manager) reconcileLoop(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		m.takeOffers(ctx)
		pass, cancel := context.WithCancel(ctx)
		m.offerMu.Lock()
		m.passCancel = cancel
		waiting := len(m.offers) > 0
		m.offerMu.Unlock()
		var next time.Time
		if !waiting {
			next = m.reconcile(pass)
		}
		m.offerMu.Lock()
		m.passCancel = nil
		m.offerMu.Unlock()
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if !next.IsZero() {
			timer.Reset(max(0, next.Sub(m.o.Now())))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-m.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

func (m *Manager) takeOffers(ctx context.Context) {
	m.offerMu.Lock()
	offers := m.offers
	m.offers = nil
	m.offerMu.Unlock()
	for _, sd := range offers {
		m.accept(ctx, sd)
	}
}

// accept checks one offered desired state and, when it passes, persists it
// and makes it the one to converge to.
func (m *Manager) accept(ctx context.Context, sd *pb.SignedDesiredState) {
	// The signature first: nothing of an unverified document is parsed
	// beyond its envelope.
	if err := m.o.Guard.CheckDesired(sd); err != nil {
		m.refuse(ctx, 0, err.Error())
		return
	}
	ds, err := DecodeDesired(sd)
	if err != nil {
		m.refuse(ctx, 0, fmt.Sprintf("malformed desired state: %v", err))
		return
	}
	gen := ds.GetGeneration()
	if ds.GetDeviceId() != m.o.DeviceID {
		m.refuse(ctx, gen, fmt.Sprintf("desired state is for device %q, this is %q", ds.GetDeviceId(), m.o.DeviceID))
		return
	}
	raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(sd)
	if err != nil {
		m.refuse(ctx, gen, fmt.Sprintf("desired state: %v", err))
		return
	}
	last := m.accepted.Load()
	m.mu.RLock()
	same := gen == last && string(raw) == string(m.desiredRaw)
	m.mu.RUnlock()
	if same {
		// The broker redelivers the retained desired state on every
		// reconnect; that is not a replay.
		m.log.Debug("desired state already accepted", "generation", gen)
		return
	}
	if gen <= last {
		m.refuse(ctx, gen, fmt.Sprintf("desired state generation %d is not above the last accepted generation %d; refusing it as a replay", gen, last))
		return
	}
	now := m.o.Now()
	if exp := ds.GetExpiresAtUnixMs(); exp != 0 && now.Add(-m.o.ClockSkew).UnixMilli() > exp {
		m.refuse(ctx, gen, fmt.Sprintf("desired state generation %d expired at %s (device clock %s, %s of skew allowed); the controller must issue a fresh one",
			gen, time.UnixMilli(exp).UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), m.o.ClockSkew))
		return
	}
	if iss := ds.GetIssuedAtUnixMs(); iss != 0 && iss > now.Add(m.o.ClockSkew).UnixMilli() {
		m.refuse(ctx, gen, fmt.Sprintf("desired state generation %d was issued at %s, more than %s after this device's clock (%s); fix the device clock (NTP)",
			gen, time.UnixMilli(iss).UTC().Format(time.RFC3339), m.o.ClockSkew, now.UTC().Format(time.RFC3339)))
		return
	}
	if err := durable.WriteFile(filepath.Join(m.o.DataDir, DesiredFile), raw); err != nil {
		// Not acted on: acting on a state we could not record would
		// resume a different convergence after a restart.
		m.noteError(fmt.Sprintf("cannot persist desired state generation %d: %v", gen, err))
		m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Generation: gen,
			Detail: fmt.Sprintf("cannot persist desired state: %v; free disk space on the device", err), AtUnixMs: m.o.Now().UnixMilli()})
		return
	}
	// desired.pb holds the generation too; the separate file keeps it when
	// desired.pb is lost or unreadable, so a failure here is only logged.
	if err := durable.WriteFile(filepath.Join(m.o.DataDir, GenerationFile), []byte(strconv.FormatUint(gen, 10)+"\n")); err != nil {
		m.log.Error("cannot persist the accepted generation", "generation", gen, "err", err)
		m.noteError(fmt.Sprintf("cannot persist generation %d: %v", gen, err))
	}
	m.mu.Lock()
	m.desired, m.desiredRaw = ds, raw
	m.accepted.Store(gen)
	m.mu.Unlock()
	// A new generation retries what failed for a transient reason now;
	// bundles that failed to load stay refused (same digest, same bytes).
	// A renewal repeats the orders it renews: nothing is retried early.
	for s, f := range m.failures {
		if ds.GetRenewsGeneration() == 0 && (!f.permanent || f.assignment) {
			delete(m.failures, s)
		}
	}
	m.log.Info("accepted desired state", "generation", gen, "slots", len(ds.GetSlots()))
	m.o.Reporter.StateChanged()
}

func (m *Manager) refuse(ctx context.Context, gen uint64, why string) {
	m.log.Warn("refused desired state", "generation", gen, "reason", why)
	m.noteError(why)
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_REFUSED, Generation: gen, Detail: why, AtUnixMs: m.o.Now().UnixMilli()})
}

// reconcile applies the actions Diff yields and returns when to try again
// (zero: nothing to retry).
func (m *Manager) reconcile(ctx context.Context) time.Time {
	m.mu.RLock()
	ds := m.desired
	running := map[string]string{}
	for name, s := range m.slots {
		running[name] = ""
		if s.active != nil {
			running[name] = s.active.ref.Digest
		}
	}
	m.mu.RUnlock()
	if ds == nil {
		return time.Time{}
	}
	m.dropStaleCandidates(ctx, ds)
	var next time.Time
	for _, a := range Diff(ds.GetSlots(), running) {
		if ctx.Err() != nil {
			return time.Time{}
		}
		switch a.Op {
		case OpRemove:
			if err := m.remove(ctx, a.Slot); err != nil {
				m.noteError(err.Error())
				next = earliest(next, m.o.Now().Add(m.o.RetryMin))
			}
		case OpInstall:
			digest := a.Assign.GetModel().GetBundleSha256()
			if m.refusedFor(a.Slot, digest, OrdersGeneration(ds)) {
				continue // rolled back or refused in this generation: reported already
			}
			if c := m.candidateOf(a.Slot); c != nil && c.l.ref.Digest == digest {
				if m.keepShadowing(a.Slot, c, a.Assign, ds.GetGeneration()) {
					continue // shadowing
				}
				// The controller assigns the candidate without a shadow
				// phase now: it has judged the figures; switch.
				if err := m.promote(ctx, a.Slot, c, a.Assign, ds.GetGeneration(), "switched by the controller after the shadow phase: "+c.stats().String()); err != nil {
					m.fail(ctx, ds.GetGeneration(), a.Assign, err)
				}
				continue
			}
			if f := m.failures[a.Slot]; f != nil && f.digest == digest {
				if f.permanent {
					continue
				}
				if m.o.Now().Before(f.next) {
					next = earliest(next, f.next)
					continue
				}
			}
			err := m.install(ctx, ds.GetGeneration(), a.Assign)
			if err == nil {
				delete(m.failures, a.Slot)
				continue
			}
			if ctx.Err() != nil {
				// Superseded by a newer desired state, or stopping: not a failure.
				m.setPending(a.Slot, nil, m.lastError(a.Slot))
				return time.Time{}
			}
			f := m.fail(ctx, ds.GetGeneration(), a.Assign, err)
			if !f.permanent {
				next = earliest(next, f.next)
			}
		}
	}
	m.prune()
	return next
}

// permanentError marks failures that retrying the same bundle cannot fix.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

// assignmentError marks a refusal of the assignment rather than of the
// bundle: permanent for this generation only.
type assignmentError struct{ error }

func (e assignmentError) Unwrap() error { return e.error }

func (m *Manager) fail(ctx context.Context, gen uint64, a *pb.SlotAssignment, err error) *failure {
	digest := a.GetModel().GetBundleSha256()
	f := m.failures[a.GetSlot()]
	if f == nil || f.digest != digest {
		f = &failure{digest: digest}
		m.failures[a.GetSlot()] = f
	}
	f.attempts++
	var perm permanentError
	f.permanent = errors.As(err, &perm)
	var asg assignmentError
	f.assignment = errors.As(err, &asg)
	d := m.o.RetryMin
	for i := 1; i < f.attempts && d < m.o.RetryMax; i++ {
		d *= 2
	}
	d = min(d, m.o.RetryMax)
	d = d/2 + time.Duration(rand.Float64()*float64(d/2))
	f.next = m.o.Now().Add(d)
	detail := err.Error()
	log := m.log.With("slot", a.GetSlot(), "model", a.GetModel().GetName(), "version", a.GetModel().GetVersion(), "generation", gen)
	if f.permanent {
		log.Error("deployment failed; keeping the running model", "err", err)
		m.setPending(a.GetSlot(), nil, detail)
	} else {
		log.Warn("deployment failed; keeping the running model and retrying", "err", err, "attempt", f.attempts, "retry_in", d.Round(time.Millisecond))
		m.setPending(a.GetSlot(), a.GetModel(), detail)
	}
	m.noteError(fmt.Sprintf("slot %s: %s", a.GetSlot(), detail))
	m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Slot: a.GetSlot(), Model: a.GetModel(),
		Generation: gen, RolloutId: a.GetRolloutId(), Detail: detail, AtUnixMs: m.o.Now().UnixMilli()})
	m.o.Reporter.StateChanged()
	return f
}

// install brings one assignment into service, or into its shadow phase.
func (m *Manager) install(ctx context.Context, gen uint64, a *pb.SlotAssignment) error {
	ref := a.GetModel()
	digest := ref.GetBundleSha256()
	next := Ref{Name: ref.GetName(), Version: ref.GetVersion(), Digest: digest}
	log := m.log.With("slot", a.GetSlot(), "model", ref.GetName(), "version", ref.GetVersion(), "generation", gen, "rollout", a.GetRolloutId())
	event := func(kind pb.EventKind) {
		m.o.Reporter.Event(ctx, &pb.Event{Kind: kind, Slot: a.GetSlot(), Model: ref, Generation: gen,
			RolloutId: a.GetRolloutId(), AtUnixMs: m.o.Now().UnixMilli()})
	}
	m.setPending(a.GetSlot(), ref, m.lastError(a.GetSlot()))
	running := m.activeRef(a.GetSlot())
	if err := m.o.Guard.CheckVersion(a.GetSlot(), running, next, a.GetRollback()); err != nil {
		return permanentError{assignmentError{err}}
	}

	// The previous version, kept loaded for a rollback, switches back at
	// once: its bundle was verified and self-tested when it came.
	l := m.loadedIn(a.GetSlot(), digest)
	if l != nil {
		event(pb.EventKind_EVENT_KIND_VERIFIED)
		return m.activate(ctx, a.GetSlot(), l, a, gen, "")
	}

	if !m.store.Has(digest) {
		u, err := m.resolve(a.GetUrl())
		if err != nil {
			return permanentError{err}
		}
		log.Info("downloading bundle", "url", u, "size", a.GetSize())
		event(pb.EventKind_EVENT_KIND_DOWNLOADING)
		dctx, cancel := context.WithTimeout(ctx, m.o.DownloadTimeout)
		_, err = m.store.Fetch(dctx, u, digest, a.GetSize())
		cancel()
		if err != nil {
			return err
		}
	}
	b, err := m.readStored(digest)
	if err != nil {
		m.store.Remove(digest)
		return err
	}
	if b.Manifest.Name != ref.GetName() || b.Manifest.Version != ref.GetVersion() {
		return permanentError{fmt.Errorf("bundle %s holds %s %s, but the desired state names %s %s; fix the assignment on the controller",
			digest, b.Manifest.Name, b.Manifest.Version, ref.GetName(), ref.GetVersion())}
	}
	if err := m.o.Guard.CheckBundle(b); err != nil {
		return permanentError{err}
	}
	event(pb.EventKind_EVENT_KIND_VERIFIED)
	// Loading runs foreign code through a compiler: record the attempt
	// first, so a death in it is noticed at the next start.
	if err := m.writeLoading(&LoadingRecord{Slot: a.GetSlot(), Digest: digest, Attempts: m.loadAttempts[digest] + 1}); err != nil {
		return fmt.Errorf("cannot record the load attempt (%w); free disk space on the device", err)
	}
	m.precompile(ctx, log, b)
	model, err := m.o.Loader.Load(ctx, b)
	if werr := m.writeLoading(nil); werr != nil {
		m.log.Error("cannot update the state file", "err", werr)
	}
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		return permanentError{err}
	}
	l = &loaded{ref: next, model: model}
	if p := m.shadowPolicy(a.GetSlot(), a); p != nil {
		if err := m.startShadow(ctx, a.GetSlot(), l, a, gen, *p); err != nil {
			l.close(context.WithoutCancel(ctx))
			return err
		}
		log.Info("candidate in shadow", "min_inferences", p.MinInferences, "min_agreement", p.MinAgreement, "hold", p.Hold)
		return nil
	}
	if err := m.activate(ctx, a.GetSlot(), l, a, gen, ""); err != nil {
		l.close(context.WithoutCancel(ctx))
		return err
	}
	return nil
}

// writeLoading writes state.json for the slots as they are, with l as its
// loading record (nil: none).
func (m *Manager) writeLoading(l *LoadingRecord) error {
	m.switchMu.Lock()
	defer m.switchMu.Unlock()
	m.mu.RLock()
	st := m.stateLocked("", nil)
	m.mu.RUnlock()
	if l != nil {
		st.Loading = l
	}
	return writeState(filepath.Join(m.o.DataDir, StateFile), st)
}

func (m *Manager) lastError(name string) string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if s := m.slots[name]; s != nil {
		return s.lastErr
	}
	return ""
}

func (m *Manager) noteError(e string) {
	m.mu.Lock()
	m.errs = append(m.errs, e)
	if len(m.errs) > maxRecentErrors {
		m.errs = m.errs[len(m.errs)-maxRecentErrors:]
	}
	m.mu.Unlock()
}

// prune deletes stored bundles no slot needs: not active, previous,
// candidate or desired.
func (m *Manager) prune() {
	keep := map[string]bool{}
	m.mu.RLock()
	for _, s := range m.slots {
		if s.active != nil {
			keep[s.active.ref.Digest] = true
		}
		if s.previous != nil {
			keep[s.previous.Digest] = true
		}
		if s.cand != nil {
			keep[s.cand.l.ref.Digest] = true
		}
	}
	for _, a := range m.desired.GetSlots() {
		keep[a.GetModel().GetBundleSha256()] = true
	}
	m.mu.RUnlock()
	if m.poisoned != nil && !keep[m.poisoned.Digest] {
		m.mu.Lock()
		m.poisoned = nil // no longer desired; the next state write drops it
		m.mu.Unlock()
	}
	if gone, err := m.store.Prune(keep); err != nil {
		m.log.Warn("cannot prune stored bundles", "err", err)
	} else if len(gone) > 0 {
		m.log.Info("pruned stored bundles", "files", gone)
	}
}

// resolve turns an assignment's url into an absolute http(s) URL: an
// absolute URL stays as it is, anything else resolves against the
// controller's URL.
func (m *Manager) resolve(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("bundle url %q: %w", raw, err)
	}
	if !u.IsAbs() {
		u = m.base.ResolveReference(u)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("bundle url %q resolves to %q; want an http or https URL (check --controller)", raw, u)
	}
	return u.String(), nil
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// Generation-independent reads for the reporter and the endpoint.

// DesiredSlots returns how many slots the accepted desired state lists.
func (m *Manager) DesiredSlots() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.desired.GetSlots())
}

// RecentErrors returns the last few errors, oldest first.
func (m *Manager) RecentErrors() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]string(nil), m.errs...)
}
