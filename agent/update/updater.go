package update

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/fetch"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
)

// ErrRestart is returned by Run once the new binary is in place: the
// agent stops cleanly and its main re-executes the binary (Exec).
var ErrRestart = errors.New("agent binary replaced by a new release; re-executing")

// DefaultDeadline is how long a new version has to connect and report
// healthy before the watchdog restores the previous one.
const DefaultDeadline = 60 * time.Second

// ReleasesDir holds downloaded release binaries under the data directory.
const ReleasesDir = "agent-releases"

// Reporter receives what the updater tells the controller (the agent).
type Reporter interface {
	Event(ctx context.Context, ev *pb.Event)
	StateChanged()
}

// Options configure an Updater. DataDir, Exe and Version are required.
type Options struct {
	DataDir string
	// Exe is the path of the running agent binary, the one replaced.
	Exe string
	// Version is the running agent's version.
	Version string
	// Controller is the base URL relative release URLs resolve against.
	Controller string
	HTTPClient *http.Client
	// Release holds the release keys a release must be signed by; nil
	// checks no signature (only with AllowUnsigned, or an agent with no
	// keys at all, which warns at start).
	Release       *trust.KeySet
	AllowUnsigned bool
	// SignedRollbacks is set when desired states are director-signed, so
	// a rollback order may take the agent below its version floor.
	SignedRollbacks bool
	// Deadline is the trial of a new version when the desired state sets
	// none (DefaultDeadline).
	Deadline time.Duration
	// RetryMin and RetryMax bound the backoff after a failed download (2s, 5m).
	RetryMin, RetryMax time.Duration
	Reporter           Reporter
	// Desired returns the agent release the accepted desired state names
	// (nil: none) and its generation. Run calls it on its own goroutine
	// after each Poke, so Poke is safe from anywhere, locks held or not.
	Desired func() (*pb.AgentRelease, uint64)
	// Prewarm, if set, has the staged new binary (its path) compile the
	// running models into the compilation cache before the swap (the
	// agent runs RunPrecompile), so the restart restores them from a warm
	// cache. A failure is only logged: the new process compiles them then.
	Prewarm func(ctx context.Context, exe string) error
	Logger  *slog.Logger
	Now     func() time.Time
}

// Updater installs the agent release the desired state names. Make it
// with New when the agent starts (it settles a record left by the last
// run), run it with Run.
type Updater struct {
	o     Options
	log   *slog.Logger
	base  *url.URL
	store *fetch.Store
	wake  chan struct{}
	since time.Time

	mu       sync.Mutex
	rec      *Record // the record as last written, nil: none
	want     *pb.AgentRelease
	gen      uint64
	healthy  bool
	pending  string
	lastErr  string
	rollout  string
	deferred *pb.Event
	// failed remembers a release that failed in a generation: it is not
	// tried again before a newer one.
	failedVer string
	failedGen uint64
	retryAt   time.Time
	attempts  int
}

// New checks the options and settles the record the last run left.
func New(o Options) (*Updater, error) {
	if o.DataDir == "" || o.Exe == "" || o.Version == "" || o.Desired == nil {
		return nil, errors.New("update: DataDir, Exe, Version and Desired are required")
	}
	base, err := url.Parse(o.Controller)
	if err != nil {
		return nil, fmt.Errorf("update: controller URL %q: %w", o.Controller, err)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Deadline <= 0 {
		o.Deadline = DefaultDeadline
	}
	if o.RetryMin <= 0 {
		o.RetryMin = 2 * time.Second
	}
	if o.RetryMax < o.RetryMin {
		o.RetryMax = max(5*time.Minute, o.RetryMin)
	}
	if o.HTTPClient == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = 30 * time.Second
		o.HTTPClient = &http.Client{Transport: tr}
	}
	u := &Updater{
		o: o, log: o.Logger, base: base, wake: make(chan struct{}, 1), since: o.Now(),
		store: &fetch.Store{Dir: filepath.Join(o.DataDir, ReleasesDir), Client: o.HTTPClient, Logger: o.Logger, MaxSize: release.MaxBinary},
	}
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("data directory %s: %w; set --data to a writable directory", o.DataDir, err)
	}
	if err := u.settle(); err != nil {
		return nil, err
	}
	return u, nil
}

// settle decides what a record found at start means for this run.
func (u *Updater) settle() error {
	rec, err := ReadRecord(u.o.DataDir)
	if err != nil {
		return err
	}
	v := u.o.Version
	switch {
	case rec == nil:
	case rec.State == StateTrial && v == rec.To:
		u.log.Info("agent update on trial", "from", rec.From, "to", rec.To, "deadline", rec.Deadline().UTC().Format(time.RFC3339))
		u.rollout = rec.RolloutID
	case rec.State == StateTrial:
		// Died before the swap, or run from another binary: nothing was
		// replaced; the desired state will order the update again.
		u.log.Warn("agent update interrupted before the new binary was in place; it will be retried", "from", rec.From, "to", rec.To, "running", v)
		rec = nil
	case rec.State == StateHealthy && v == rec.To:
		u.rollout = rec.RolloutID
	case rec.State == StateHealthy:
		rec = nil
	case rec.State == StateRestored && v != rec.To:
		u.rollout = rec.RolloutID
		u.lastErr = fmt.Sprintf("agent %s was undone by the watchdog: %s", rec.To, rec.Reason)
		u.deferred = u.event(pb.EventKind_EVENT_KIND_ROLLED_BACK, rec.To, rec.RolloutID, rec.Generation, u.lastErr+"; back on "+v)
		u.failedVer, u.failedGen = rec.To, rec.Generation
	case rec.State == StateRestored:
		// Only the supervisor restores; without it the new binary stays.
		u.log.Error("the update record says the previous binary was restored, but this is the new version; run the agent under `fleet-agent supervise`", "to", rec.To)
		rec = nil
	case rec.State == StateFailed:
		u.lastErr, u.rollout = rec.Reason, rec.RolloutID
		u.failedVer, u.failedGen = rec.To, rec.Generation
	}
	if rec == nil {
		if err := WriteRecord(u.o.DataDir, nil); err != nil {
			return fmt.Errorf("update record: %w", err)
		}
	}
	u.rec = rec
	return nil
}

func (u *Updater) event(kind pb.EventKind, version, rollout string, gen uint64, detail string) *pb.Event {
	return &pb.Event{Kind: kind, Slot: release.Slot, Model: &pb.ModelRef{Name: release.Model, Version: version, BundleSha256: release.Digest(version)},
		Generation: gen, RolloutId: rollout, Detail: detail, AtUnixMs: u.o.Now().UnixMilli()}
}

// Poke tells Run that the accepted desired state may have changed. It
// never blocks and takes no lock.
func (u *Updater) Poke() {
	select {
	case u.wake <- struct{}{}:
	default:
	}
}

// offer takes the accepted desired state's agent release.
func (u *Updater) offer() {
	ar, gen := u.o.Desired()
	u.mu.Lock()
	if gen != u.gen {
		u.retryAt, u.attempts = time.Time{}, 0
	}
	u.want, u.gen = ar, gen
	u.mu.Unlock()
}

// Connected is called once the agent connected and published its state:
// the healthy marker of a version on trial.
func (u *Updater) Connected() {
	u.mu.Lock()
	defer u.mu.Unlock()
	first := !u.healthy
	u.healthy = true
	if first {
		defer u.o.Reporter.StateChanged()
	}
	rec := u.rec
	if rec == nil || rec.State != StateTrial {
		return
	}
	next := *rec
	next.State = StateHealthy
	next.ProbationUnixMs = u.o.Now().Add(u.o.Deadline).UnixMilli()
	if err := writeFloor(u.o.DataDir, rec.To); err != nil {
		u.log.Error("cannot raise the agent version floor", "version", rec.To, "err", err)
	}
	if err := WriteRecord(u.o.DataDir, &next); err != nil {
		// The trial goes on; the watchdog may restore a version that
		// works, which is the safe side.
		u.log.Error("cannot write the healthy marker", "err", err)
		return
	}
	u.rec = &next
	u.log.Info("agent update healthy", "from", rec.From, "to", rec.To)
}

// State is the AgentUpdateState to report.
func (u *Updater) State() *pb.AgentUpdateState {
	u.mu.Lock()
	defer u.mu.Unlock()
	st := &pb.AgentUpdateState{Running: u.o.Version, Healthy: u.healthy, SinceUnixMs: u.since.UnixMilli(),
		Pending: u.pending, LastError: u.lastErr, RolloutId: u.rollout}
	if u.rec != nil && (u.rec.State == StateTrial || u.rec.State == StateHealthy) {
		st.Previous = u.rec.From
	}
	return st
}

// Run installs desired releases until ctx ends (nil) or a new binary is
// in place (ErrRestart).
func (u *Updater) Run(ctx context.Context) error {
	if ev := u.deferred; ev != nil {
		u.o.Reporter.Event(ctx, ev)
		u.mu.Lock()
		next := *u.rec
		next.State = StateFailed
		if err := WriteRecord(u.o.DataDir, &next); err != nil {
			u.log.Error("cannot write the update record", "err", err)
		} else {
			u.rec = &next
		}
		u.deferred = nil
		u.mu.Unlock()
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next, err := u.step(ctx)
		if err != nil {
			return err
		}
		timer.Stop()
		if !next.IsZero() {
			timer.Reset(max(0, next.Sub(u.o.Now())))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-u.wake:
		case <-timer.C:
		}
	}
}

// step does what is due and returns when to look again (zero: when woken).
func (u *Updater) step(ctx context.Context) (time.Time, error) {
	u.offer()
	u.mu.Lock()
	rec, want, gen := u.rec, u.want, u.gen
	retryAt := u.retryAt
	u.mu.Unlock()
	now := u.o.Now()
	if rec != nil && rec.State == StateHealthy {
		p := time.UnixMilli(rec.ProbationUnixMs)
		if now.Before(p) {
			return p, nil
		}
		u.mu.Lock()
		if err := WriteRecord(u.o.DataDir, nil); err == nil {
			u.rec = nil
			u.log.Info("agent update finished", "from", rec.From, "to", rec.To)
		}
		u.mu.Unlock()
		return time.Time{}, nil
	}
	if rec != nil && rec.State == StateTrial {
		return time.Time{}, nil // Connected ends it, or the watchdog
	}
	if want == nil || want.GetVersion() == u.o.Version {
		u.setPending("", "")
		return time.Time{}, nil
	}
	u.mu.Lock()
	refused := u.failedVer == want.GetVersion() && u.failedGen == gen
	u.mu.Unlock()
	if refused {
		return time.Time{}, nil
	}
	if now.Before(retryAt) {
		return retryAt, nil
	}
	err := u.install(ctx, want, gen)
	if errors.Is(err, ErrRestart) || ctx.Err() != nil {
		return time.Time{}, err
	}
	if err == nil {
		return time.Time{}, nil
	}
	return u.fail(ctx, want, gen, err), nil
}

func (u *Updater) setPending(v, errText string) {
	u.mu.Lock()
	changed := u.pending != v || (errText != "" && u.lastErr != errText)
	u.pending = v
	if errText != "" {
		u.lastErr = errText
	}
	u.mu.Unlock()
	if changed {
		u.o.Reporter.StateChanged()
	}
}

// permanent marks failures that retrying the same release cannot fix.
type permanent struct{ error }

func (e permanent) Unwrap() error { return e.error }

func (u *Updater) fail(ctx context.Context, ar *pb.AgentRelease, gen uint64, err error) time.Time {
	var perm permanent
	isPerm := errors.As(err, &perm)
	u.log.Error("agent update failed; keeping the running binary", "version", ar.GetVersion(), "generation", gen, "err", err, "retry", !isPerm)
	u.o.Reporter.Event(ctx, u.event(pb.EventKind_EVENT_KIND_FAILED, ar.GetVersion(), ar.GetRolloutId(), gen, err.Error()))
	u.mu.Lock()
	var next time.Time
	if isPerm {
		u.failedVer, u.failedGen = ar.GetVersion(), gen
		rec := &Record{State: StateFailed, From: u.o.Version, To: ar.GetVersion(), Exe: u.o.Exe, RolloutID: ar.GetRolloutId(), Generation: gen, Reason: err.Error()}
		if werr := WriteRecord(u.o.DataDir, rec); werr == nil {
			u.rec = rec
		}
	} else {
		u.attempts++
		d := u.o.RetryMin
		for i := 1; i < u.attempts && d < u.o.RetryMax; i++ {
			d *= 2
		}
		next = u.o.Now().Add(min(d, u.o.RetryMax))
		u.retryAt = next
	}
	u.mu.Unlock()
	pending := ar.GetVersion()
	if isPerm {
		pending = ""
	}
	u.setPending(pending, err.Error())
	return next
}

// install downloads, verifies and swaps in release ar. It returns
// ErrRestart once the new binary is in place.
func (u *Updater) install(ctx context.Context, ar *pb.AgentRelease, gen uint64) error {
	v := ar.GetVersion()
	log := u.log.With("version", v, "generation", gen, "rollout", ar.GetRolloutId())
	u.mu.Lock()
	u.rollout = ar.GetRolloutId()
	u.mu.Unlock()
	u.setPending(v, "")
	report := func(kind pb.EventKind, detail string) {
		u.o.Reporter.Event(ctx, u.event(kind, v, ar.GetRolloutId(), gen, detail))
	}
	if !release.ValidVersion(v) {
		return permanent{fmt.Errorf("agent release version %q is malformed; fix the rollout on the controller", v)}
	}
	// The version floor, before anything is downloaded.
	floor, err := ReadFloor(u.o.DataDir)
	if err != nil {
		return permanent{fmt.Errorf("agent version floor: %w; restore or delete %s", err, filepath.Join(u.o.DataDir, FloorFile))}
	}
	if deploy.CompareVersions(u.o.Version, floor) > 0 {
		floor = u.o.Version
	}
	if deploy.CompareVersions(v, floor) < 0 {
		if !ar.GetRollback() || !u.o.SignedRollbacks {
			why := "the desired state does not order a rollback"
			if ar.GetRollback() {
				why = "its rollback order is not director-signed (configure --director-key and drop --allow-unsigned)"
			}
			return permanent{fmt.Errorf("agent release %s is below the version floor %s (installed %s), and %s; refusing the downgrade", v, floor, u.o.Version, why)}
		}
		log.Warn("signed rollback order below the agent version floor", "floor", floor)
	}

	report(pb.EventKind_EVENT_KIND_DOWNLOADING, "")
	m, docURL, err := u.fetchManifest(ctx, ar)
	if err != nil {
		return err
	}
	// The binary is an artifact of the server that served the document.
	binURL := docURL.ResolveReference(&url.URL{Path: "/v1/artifacts/" + m.SHA256}).String()
	path, err := u.store.Fetch(ctx, binURL, m.SHA256, m.Size)
	if err != nil {
		if errors.Is(err, fetch.ErrDigestMismatch) || errors.Is(err, fetch.ErrTooLarge) {
			return permanent{err}
		}
		return err
	}
	sum, _ := hex.DecodeString(m.SHA256)
	if err := stage(u.o.Exe, path, sum); err != nil {
		return err
	}
	// Prove the staged binary starts on this device and is the version it
	// claims, before it replaces anything.
	got, err := BinaryVersion(ctx, newPath(u.o.Exe))
	if err != nil || got != v {
		os.Remove(newPath(u.o.Exe))
		if err == nil {
			err = fmt.Errorf("it says it is version %s", got)
		}
		return permanent{fmt.Errorf("agent release %s does not run on this device: %w", v, err)}
	}
	if u.o.Prewarm != nil {
		// While this process still serves: what the new one would
		// otherwise compile after the exec, in the local endpoint's gap.
		start := time.Now()
		if err := u.o.Prewarm(ctx, newPath(u.o.Exe)); err != nil {
			log.Warn("the new binary did not precompile the models; it compiles them after the restart", "err", err)
		} else {
			log.Info("models precompiled by the new binary", "took", time.Since(start).Round(time.Millisecond))
		}
	}
	report(pb.EventKind_EVENT_KIND_VERIFIED, "")

	if err := keepOld(u.o.Exe); err != nil {
		return fmt.Errorf("keep the running binary as %s: %w", OldPath(u.o.Exe), err)
	}
	deadline := u.o.Deadline
	if ms := ar.GetDeadlineMs(); ms > 0 {
		deadline = time.Duration(ms) * time.Millisecond
	}
	rec := &Record{State: StateTrial, From: u.o.Version, To: v, Exe: u.o.Exe, RolloutID: ar.GetRolloutId(), Generation: gen,
		SwappedUnixMs: u.o.Now().UnixMilli(), DeadlineUnixMs: u.o.Now().Add(deadline).UnixMilli()}
	if err := WriteRecord(u.o.DataDir, rec); err != nil {
		return fmt.Errorf("write the update record: %w; free disk space on the device", err)
	}
	u.mu.Lock()
	u.rec = rec
	u.mu.Unlock()
	if err := swapIn(u.o.Exe); err != nil {
		// NAME is still the old binary: the record is dropped at the next
		// start; drop it now.
		if werr := WriteRecord(u.o.DataDir, nil); werr == nil {
			u.mu.Lock()
			u.rec = nil
			u.mu.Unlock()
		}
		return err
	}
	report(pb.EventKind_EVENT_KIND_AGENT_RESTARTING, fmt.Sprintf("from %s; the watchdog gives it %s to connect and report", u.o.Version, deadline))
	log.Info("new agent binary in place; restarting", "from", u.o.Version, "exe", u.o.Exe, "deadline", deadline)
	u.store.Remove(m.SHA256)
	return ErrRestart
}

// fetchManifest downloads and checks the signed release document of this
// device's platform.
func (u *Updater) fetchManifest(ctx context.Context, ar *pb.AgentRelease) (release.Manifest, *url.URL, error) {
	ref, err := url.Parse(ar.GetUrl() + "/" + runtime.GOOS + "/" + runtime.GOARCH)
	if err != nil {
		return release.Manifest{}, nil, permanent{fmt.Errorf("agent release url %q: %w", ar.GetUrl(), err)}
	}
	if !ref.IsAbs() {
		ref = u.base.ResolveReference(ref)
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, ref.String(), nil)
	if err != nil {
		return release.Manifest{}, nil, permanent{err}
	}
	resp, err := u.o.HTTPClient.Do(req)
	if err != nil {
		return release.Manifest{}, nil, fmt.Errorf("agent release %s: %w", ref, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return release.Manifest{}, nil, permanent{fmt.Errorf("agent release %s has no build for %s/%s on the controller (%s); push one with fleet agent release push --os %s --arch %s",
			ar.GetVersion(), runtime.GOOS, runtime.GOARCH, ref, runtime.GOOS, runtime.GOARCH)}
	}
	if resp.StatusCode != http.StatusOK {
		return release.Manifest{}, nil, fmt.Errorf("agent release %s: controller answered %s", ref, resp.Status)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, release.MaxDocument+1))
	if err != nil {
		return release.Manifest{}, nil, fmt.Errorf("agent release %s: %w", ref, err)
	}
	m, err := u.check(raw, ar.GetVersion())
	return m, ref, err
}

// check verifies a signed release document: signature, version and
// platform. Every refusal is permanent: the same document fails again.
func (u *Updater) check(raw []byte, want string) (release.Manifest, error) {
	doc, m, err := release.Decode(raw)
	if err != nil {
		return m, permanent{err}
	}
	switch {
	case u.o.Release != nil && len(doc.Signatures) == 0 && u.o.AllowUnsigned:
		u.log.Warn("ACCEPTING AN UNSIGNED AGENT RELEASE (--allow-unsigned)", "version", m.Version)
	case u.o.Release != nil:
		if err := doc.Verify(u.o.Release); err != nil {
			return m, permanent{fmt.Errorf("agent release %s refused: %w; sign it with a release key this agent trusts (--release-key)", m.Version, err)}
		}
	}
	if m.Version != want {
		return m, permanent{fmt.Errorf("the signed release document is for version %s, the desired state names %s; fix the release on the controller", m.Version, want)}
	}
	if m.OS != runtime.GOOS || m.Arch != runtime.GOARCH {
		return m, permanent{fmt.Errorf("agent release %s is built for %s, this device is %s/%s; push a build for it", m.Version, m.Platform(), runtime.GOOS, runtime.GOARCH)}
	}
	return m, nil
}
