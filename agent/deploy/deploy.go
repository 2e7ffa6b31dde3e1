// Package deploy converges the models an agent runs to the desired state
// the controller publishes, and keeps serving the last good model whatever
// happens on the way.
//
// The flow for each accepted desired state:
//
//  1. Offer queues a SignedDesiredState (from the MQTT handler; it never
//     blocks). Run checks it: for this device, generation above the last
//     accepted one, not expired. A refused one is logged and reported as a
//     REFUSED event.
//  2. The accepted state is written to DATA/desired.pb (atomically) before
//     anything acts on it, so a power cut resumes the same convergence.
//  3. Diff, a pure function, compares desired slots with running ones and
//     yields actions; Run applies them one slot at a time: download
//     (resumable, digest-checked) into DATA/bundles, decode, load in the
//     wazero host (which runs the golden tests), then switch.
//  4. A switch writes DATA/state.json first, then swaps the active model
//     (the old one becomes "previous", its bundle is kept for a rollback),
//     then reports ACTIVATED and the new state.
//
// A failure at any step reports FAILED with the error and leaves the
// running model alone. Download failures are retried with backoff; a
// bundle that downloaded correctly but does not decode or load is
// content-addressed, so retrying it cannot help: it is not retried until
// the agent restarts.
//
// Restore, run before the agent connects anywhere, loads the active model
// of every slot from state.json and the stored bundles, falling back to
// the previous model when the active one no longer loads.
package deploy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent/fetch"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// Reporter receives what the agent tells the controller. Event may block
// (it publishes); StateChanged must not (it only schedules a report).
type Reporter interface {
	Event(ctx context.Context, ev *pb.Event)
	StateChanged()
}

// Options configures a Manager. DeviceID, DataDir and Host are required.
type Options struct {
	DeviceID string
	// DataDir holds desired.pb, state.json and bundles/.
	DataDir string
	Host    *host.Host
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
}

// maxOffers bounds desired states waiting to be checked. Only the newest
// matters, so dropping old ones loses nothing but their REFUSED events.
const maxOffers = 16

// maxRecentErrors is how many errors RecentErrors keeps.
const maxRecentErrors = 10

// maxLoadAttempts is how many times the agent may die while loading one
// bundle before it stops trying (see LoadingRecord).
const maxLoadAttempts = 3

// Manager owns the slots. Create it with New, call Restore, then Run.
type Manager struct {
	o     Options
	log   *slog.Logger
	store *fetch.Store
	base  *url.URL

	// mu guards slots, desired and errs. Only the goroutine running
	// Restore and then Run changes them; readers are the endpoint and the
	// state reporter.
	mu         sync.RWMutex
	slots      map[string]*slot
	desired    *pb.DesiredState
	desiredRaw []byte
	errs       []string
	accepted   atomic.Uint64

	offerMu    sync.Mutex
	offers     []*pb.SignedDesiredState
	passCancel context.CancelFunc
	wake       chan struct{}

	// failures and loadAttempts are touched by Restore and Run only.
	failures     map[string]*failure
	loadAttempts map[string]int // by digest: loads the agent died in
	// poisoned is the loading record of a bundle refused for killing the
	// agent too often; it stays in state.json while that bundle is desired.
	poisoned *LoadingRecord
}

type slot struct {
	active   *loaded
	since    time.Time
	previous *Ref
	pending  *pb.ModelRef
	lastErr  string
}

// loaded is a model in service. Inferences hold mu for reading, so
// closing (which takes it for writing) waits for the calls in flight.
type loaded struct {
	ref   Ref
	mu    sync.RWMutex
	model *host.Model
}

func (l *loaded) close(ctx context.Context) {
	l.mu.Lock()
	m := l.model
	l.model = nil
	l.mu.Unlock()
	if m != nil {
		m.Close(ctx)
	}
}

type failure struct {
	digest    string
	attempts  int
	next      time.Time
	permanent bool
}

// New checks the options and returns a Manager with no models.
func New(o Options) (*Manager, error) {
	if o.Host == nil || o.DataDir == "" || o.DeviceID == "" {
		return nil, fmt.Errorf("deploy: DeviceID, DataDir and Host are required")
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
	if o.HTTPClient == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = 30 * time.Second
		o.HTTPClient = &http.Client{Transport: tr}
	}
	log := o.Logger.With("device", o.DeviceID)
	return &Manager{
		o:        o,
		log:      log,
		store:    &fetch.Store{Dir: filepath.Join(o.DataDir, BundlesDir), Client: o.HTTPClient, Logger: log},
		base:     base,
		slots:    map[string]*slot{},
		wake:     make(chan struct{}, 1),
		failures: map[string]*failure{},

		loadAttempts: map[string]int{},
	}, nil
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
	if ds, err := DecodeDesired(sd); err == nil && ds.GetDeviceId() == m.o.DeviceID &&
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

// Generation returns the generation of the last accepted desired state.
func (m *Manager) Generation() uint64 { return m.accepted.Load() }

// Run checks offered desired states and converges to the accepted one
// until ctx ends. It returns nil then; models stay loaded until Close.
func (m *Manager) Run(ctx context.Context) error {
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
	if exp := ds.GetExpiresAtUnixMs(); exp != 0 && m.o.Now().UnixMilli() > exp {
		m.refuse(ctx, gen, fmt.Sprintf("desired state generation %d expired at %s; the controller must issue a fresh one", gen, time.UnixMilli(exp).UTC().Format(time.RFC3339)))
		return
	}
	if err := atomicWrite(filepath.Join(m.o.DataDir, DesiredFile), raw); err != nil {
		// Not acted on: acting on a state we could not record would
		// resume a different convergence after a restart.
		m.noteError(fmt.Sprintf("cannot persist desired state generation %d: %v", gen, err))
		m.o.Reporter.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_FAILED, Generation: gen,
			Detail: fmt.Sprintf("cannot persist desired state: %v; free disk space on the device", err), AtUnixMs: m.o.Now().UnixMilli()})
		return
	}
	m.mu.Lock()
	m.desired, m.desiredRaw = ds, raw
	m.accepted.Store(gen)
	m.mu.Unlock()
	// A new generation retries what failed for a transient reason now;
	// bundles that failed to load stay refused (same digest, same bytes).
	for s, f := range m.failures {
		if !f.permanent {
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

// install brings one assignment into service.
func (m *Manager) install(ctx context.Context, gen uint64, a *pb.SlotAssignment) error {
	ref := a.GetModel()
	digest := ref.GetBundleSha256()
	log := m.log.With("slot", a.GetSlot(), "model", ref.GetName(), "version", ref.GetVersion(), "generation", gen)
	event := func(kind pb.EventKind) {
		m.o.Reporter.Event(ctx, &pb.Event{Kind: kind, Slot: a.GetSlot(), Model: ref, Generation: gen,
			RolloutId: a.GetRolloutId(), AtUnixMs: m.o.Now().UnixMilli()})
	}
	m.setPending(a.GetSlot(), ref, m.lastError(a.GetSlot()))
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
	event(pb.EventKind_EVENT_KIND_VERIFIED)
	// Loading runs foreign code through a compiler: record the attempt
	// first, so a death in it is noticed at the next start.
	if err := m.writeLoading(&LoadingRecord{Slot: a.GetSlot(), Digest: digest, Attempts: m.loadAttempts[digest] + 1}); err != nil {
		return fmt.Errorf("cannot record the load attempt (%w); free disk space on the device", err)
	}
	model, err := m.o.Host.Load(ctx, b)
	if err != nil {
		if werr := m.writeLoading(nil); werr != nil {
			m.log.Error("cannot update the state file", "err", werr)
		}
		if ctx.Err() != nil {
			return err
		}
		return permanentError{err}
	}
	if err := m.activate(ctx, a.GetSlot(), Ref{Name: ref.GetName(), Version: ref.GetVersion(), Digest: digest}, model); err != nil {
		model.Close(context.WithoutCancel(ctx))
		return err
	}
	log.Info("model activated")
	event(pb.EventKind_EVENT_KIND_ACTIVATED)
	m.o.Reporter.StateChanged()
	return nil
}

// writeLoading writes state.json for the slots as they are, with l as its
// loading record (nil: none).
func (m *Manager) writeLoading(l *LoadingRecord) error {
	m.mu.RLock()
	st := m.stateLocked()
	m.mu.RUnlock()
	if l != nil {
		st.Loading = l
	}
	return writeState(filepath.Join(m.o.DataDir, StateFile), st)
}

// activate records the switch in state.json, then makes model the slot's
// active one; the old active model becomes previous and is closed once
// its calls in flight finish.
func (m *Manager) activate(ctx context.Context, name string, ref Ref, model *host.Model) error {
	now := m.o.Now()
	m.mu.RLock()
	st := m.stateLocked()
	m.mu.RUnlock()
	rec := st.Slots[name]
	if rec == nil {
		rec = &SlotRecord{}
		st.Slots[name] = rec
	}
	if rec.Active != nil && rec.Active.Digest != ref.Digest {
		rec.Previous = rec.Active
	}
	r := ref
	rec.Active, rec.SinceUnixMs = &r, now.UnixMilli()
	if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
		return fmt.Errorf("cannot record the switch (%w); free disk space on the device", err)
	}
	m.mu.Lock()
	s := m.slots[name]
	if s == nil {
		s = &slot{}
		m.slots[name] = s
	}
	old := s.active
	s.active = &loaded{ref: ref, model: model}
	s.since = now
	s.previous = rec.Previous
	s.pending, s.lastErr = nil, ""
	m.mu.Unlock()
	if old != nil {
		old.close(context.WithoutCancel(ctx))
	}
	return nil
}

func (m *Manager) remove(ctx context.Context, name string) error {
	m.mu.RLock()
	st := m.stateLocked()
	m.mu.RUnlock()
	delete(st.Slots, name)
	if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
		return fmt.Errorf("cannot record the removal of slot %s (%w); free disk space on the device", name, err)
	}
	m.mu.Lock()
	s := m.slots[name]
	delete(m.slots, name)
	m.mu.Unlock()
	if s != nil && s.active != nil {
		s.active.close(context.WithoutCancel(ctx))
	}
	delete(m.failures, name)
	m.log.Info("slot removed: the desired state no longer lists it", "slot", name)
	m.o.Reporter.StateChanged()
	return nil
}

// stateLocked returns state.json's content for the slots as they are.
func (m *Manager) stateLocked() *State {
	st := &State{Version: stateVersion, Slots: map[string]*SlotRecord{}, Loading: m.poisoned}
	for name, s := range m.slots {
		rec := &SlotRecord{Previous: s.previous}
		if s.active != nil {
			r := s.active.ref
			rec.Active, rec.SinceUnixMs = &r, s.since.UnixMilli()
		}
		st.Slots[name] = rec
	}
	return st
}

func (m *Manager) setPending(name string, ref *pb.ModelRef, lastErr string) {
	m.mu.Lock()
	s := m.slots[name]
	if s == nil {
		s = &slot{}
		m.slots[name] = s
	}
	s.pending, s.lastErr = ref, lastErr
	m.mu.Unlock()
	m.o.Reporter.StateChanged()
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

// prune deletes stored bundles no slot needs: not active, not previous,
// not desired.
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

// Restore loads the last accepted desired state and the models state.json
// says were active, so the agent serves them before it has any network.
// Problems with one slot are logged and reported in its state; Restore
// fails only when the data directory itself is unusable.
func (m *Manager) Restore(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Join(m.o.DataDir, BundlesDir), 0o755); err != nil {
		return fmt.Errorf("data directory %s: %w", m.o.DataDir, err)
	}
	m.restoreDesired()
	st, err := readState(filepath.Join(m.o.DataDir, StateFile))
	if err != nil {
		m.log.Error("cannot read the state file; starting with no models", "err", err)
		m.noteError(err.Error())
		st = &State{Version: stateVersion, Slots: map[string]*SlotRecord{}}
	}
	changed := false
	if l := st.Loading; l != nil {
		changed = true
		if l.Attempts >= maxLoadAttempts {
			why := fmt.Sprintf("the agent stopped %d times while loading bundle %s; it will not try it again: assign another bundle", l.Attempts, l.Digest)
			m.failures[l.Slot] = &failure{digest: l.Digest, attempts: l.Attempts, permanent: true}
			m.poisoned = l
			m.noteError(fmt.Sprintf("slot %s: %s", l.Slot, why))
			m.log.Error("refusing a bundle the agent died loading", "slot", l.Slot, "digest", l.Digest, "attempts", l.Attempts)
			defer func() { m.setPending(l.Slot, nil, why) }()
		} else {
			m.loadAttempts[l.Digest] = l.Attempts
			m.log.Warn("the agent stopped while loading a bundle; it will try again", "slot", l.Slot, "digest", l.Digest, "attempts", l.Attempts)
		}
	}
	names := make([]string, 0, len(st.Slots))
	for name := range st.Slots {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		rec := st.Slots[name]
		s := &slot{previous: rec.Previous, since: time.UnixMilli(rec.SinceUnixMs)}
		if rec.Active != nil {
			model, err := m.loadStored(ctx, *rec.Active)
			if err == nil {
				s.active = &loaded{ref: *rec.Active, model: model}
				m.log.Info("restored model", "slot", name, "model", rec.Active.Name, "version", rec.Active.Version)
			} else {
				s.lastErr = fmt.Sprintf("active model %s %s does not load: %v", rec.Active.Name, rec.Active.Version, err)
				m.log.Error("cannot restore the active model", "slot", name, "model", rec.Active.Name, "version", rec.Active.Version, "err", err)
				if rec.Previous != nil {
					if model, perr := m.loadStored(ctx, *rec.Previous); perr == nil {
						s.active = &loaded{ref: *rec.Previous, model: model}
						s.previous, s.since = nil, m.o.Now()
						s.lastErr += "; serving the previous model " + rec.Previous.Version
						m.log.Warn("serving the previous model instead", "slot", name, "model", rec.Previous.Name, "version", rec.Previous.Version)
					}
				}
				m.noteError(s.lastErr)
				changed = true
			}
		}
		m.slots[name] = s
	}
	if changed {
		m.mu.RLock()
		st := m.stateLocked()
		m.mu.RUnlock()
		if err := writeState(filepath.Join(m.o.DataDir, StateFile), st); err != nil {
			m.log.Error("cannot update the state file", "err", err)
		}
	}
	return nil
}

func (m *Manager) restoreDesired() {
	path := filepath.Join(m.o.DataDir, DesiredFile)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		m.log.Error("cannot read the stored desired state", "path", path, "err", err)
		return
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, MaxDesired+1024))
	sd := &pb.SignedDesiredState{}
	if err == nil {
		err = proto.Unmarshal(raw, sd)
	}
	var ds *pb.DesiredState
	if err == nil {
		ds, err = DecodeDesired(sd)
	}
	if err == nil && ds.GetDeviceId() != m.o.DeviceID {
		err = fmt.Errorf("it is for device %q, this agent is %q", ds.GetDeviceId(), m.o.DeviceID)
	}
	if err != nil {
		m.log.Error("ignoring the stored desired state", "path", path, "err", err)
		return
	}
	m.mu.Lock()
	m.desired, m.desiredRaw = ds, raw
	m.accepted.Store(ds.GetGeneration())
	m.mu.Unlock()
	m.log.Info("restored desired state", "generation", ds.GetGeneration())
}

func (m *Manager) loadStored(ctx context.Context, ref Ref) (*host.Model, error) {
	b, err := m.readStored(ref.Digest)
	if err != nil {
		return nil, err
	}
	return m.o.Host.Load(ctx, b)
}

// readStored reads and decodes a stored bundle. A file whose digest no
// longer matches was damaged on disk: that error is transient (download
// it again). A file with the right digest that does not decode is a bad
// bundle: that error is permanent.
func (m *Manager) readStored(digest string) (*bundle.Bundle, error) {
	path := m.store.Path(digest)
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, bundle.MaxBundleSize+1))
	if err != nil {
		return nil, fmt.Errorf("read stored bundle %s: %w", path, err)
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != digest {
		return nil, fmt.Errorf("stored bundle %s was damaged on disk (sha256 now %s); it will be downloaded again", path, got)
	}
	b, err := bundle.Decode(data)
	if err != nil {
		return nil, permanentError{fmt.Errorf("bundle %s: %w", digest, err)}
	}
	return b, nil
}

// Acquire returns the active model serving name (a model name, or else a
// slot name) and a release func the caller must call when its inference
// is done. The model is not closed before release is called.
func (m *Manager) Acquire(name string) (*host.Model, func(), bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var l *loaded
	names := make([]string, 0, len(m.slots))
	for n := range m.slots {
		names = append(names, n)
	}
	sort.Strings(names) // deterministic when two slots run the same model
	for _, n := range names {
		if s := m.slots[n]; s.active != nil && s.active.ref.Name == name {
			l = s.active
			break
		}
	}
	if l == nil {
		if s := m.slots[name]; s != nil && s.active != nil {
			l = s.active
		}
	}
	if l == nil {
		return nil, nil, false
	}
	l.mu.RLock()
	if l.model == nil {
		l.mu.RUnlock()
		return nil, nil, false
	}
	return l.model, l.mu.RUnlock, true
}

// Ready reports whether at least one model is active.
func (m *Manager) Ready() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, s := range m.slots {
		if s.active != nil {
			return true
		}
	}
	return false
}

// Slots returns the reported state of every slot, ordered by name.
func (m *Manager) Slots() []*pb.SlotState {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*pb.SlotState, 0, len(m.slots))
	for name, s := range m.slots {
		ss := &pb.SlotState{Slot: name, LastError: s.lastErr}
		if s.pending != nil {
			ss.Pending = proto.Clone(s.pending).(*pb.ModelRef)
		}
		if s.active != nil {
			ss.Active = s.active.ref.proto()
			ss.ActiveSinceUnixMs = s.since.UnixMilli()
		}
		if s.previous != nil {
			ss.Previous = s.previous.proto()
		}
		out = append(out, ss)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Slot < out[j].Slot })
	return out
}

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

func (r Ref) proto() *pb.ModelRef {
	return &pb.ModelRef{Name: r.Name, Version: r.Version, BundleSha256: r.Digest}
}

// Close closes every loaded model, waiting for calls in flight. Call it
// after Run has returned.
func (m *Manager) Close(ctx context.Context) {
	m.mu.Lock()
	var ls []*loaded
	for _, s := range m.slots {
		if s.active != nil {
			ls = append(ls, s.active)
		}
	}
	m.mu.Unlock()
	for _, l := range ls {
		l.close(ctx)
	}
}
