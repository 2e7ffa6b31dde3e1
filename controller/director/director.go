// Package director issues each device's desired state: what model version
// runs in which slot, under a generation number that only ever increases
// for that device. The name follows Uptane, where the "director" tells each
// vehicle what to install. Each document is signed with the director key
// (Options.Key, DATA/keys/director.key) over its exact bytes, domain
// trust.DomainDesiredState, and carries an expiry (Options.Expiry, default
// DefaultExpiry) so a device cannot be frozen on a stale instruction.
//
// Order of work for an assignment: the new generation and document are
// committed to the store first, then published retained with QoS 1 on
// ef/v1/dev/{id}/desired. A document that was committed but not
// acknowledged by the broker stays marked unpublished and is published
// again after the next (re)connect, so a crash or broker outage between the
// two steps only delays delivery.
//
// The rollout engine issues desired states as part of its own transitions:
// Issue runs the engine's commit (rollout steps and desired states in one
// transaction) under the director's publish lock, with the director's
// document builder, and then publishes what it committed.
//
// The broker's acknowledgements are recorded in the store in batches by
// Run: one commit per acknowledged document would make a wave of thousands
// of devices wait on thousands of disk syncs.
package director

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// DefaultSlot is the slot an assignment uses when it names none.
const DefaultSlot = "default"

// ArtifactPath is the controller's URL path of a bundle by digest.
func ArtifactPath(digest string) string { return "/v1/artifacts/" + digest }

// Store is what the director needs from the controller's store.
type Store interface {
	Assign(ctx context.Context, ids []string, slot store.DesiredSlot, issued time.Time, build store.BuildFunc) ([]store.Desired, error)
	DesiredState(ctx context.Context, id string) (store.Desired, error)
	MarkPublishedAll(ctx context.Context, docs []store.Published) error
	UnpublishedDesired(ctx context.Context) ([]store.Desired, error)
}

// Publisher publishes to the broker.
type Publisher interface {
	// PublishAsync publishes with QoS 1 and calls done with the outcome
	// once the broker acknowledged it or a timeout passed.
	PublishAsync(topic string, payload []byte, retained bool, done func(error))
}

// Options configure a Director.
type Options struct {
	Store     Store
	Publisher Publisher
	Logger    *slog.Logger
	Metrics   *metrics.Registry
	Now       func() time.Time
	// ArtifactBaseURL, if set, makes slot URLs absolute (base +
	// ArtifactPath). Empty leaves them as paths, which the agent resolves
	// against its own --controller URL.
	ArtifactBaseURL string
	// Key signs every desired state; nil leaves them unsigned (agents
	// with a director key refuse those).
	Key ed25519.PrivateKey
	// Expiry is how long after issue a desired state stays valid; zero
	// means DefaultExpiry, negative means no expiry.
	Expiry time.Duration
}

// DefaultExpiry is how long a desired state stays valid. An agent refuses
// an expired one (with a few minutes of clock skew allowed), so an
// attacker replaying a captured state has at most this long; a device
// offline longer needs a fresh state from the controller.
const DefaultExpiry = 30 * 24 * time.Hour

// Director builds, stores and publishes desired states.
type Director struct {
	opts Options
	log  *slog.Logger
	// pubMu makes "read or commit a document, then hand it to the client"
	// one step per director, so documents reach the broker in generation
	// order and an older one can never end up as the retained message.
	pubMu sync.Mutex
	// keys is the key in use after a rotation and the announcement
	// chain (keys.go).
	keys keyring

	published *metrics.Counter
	failed    *metrics.Counter

	// marks are acknowledged documents Run has yet to record.
	markMu   sync.Mutex
	marks    []store.Published
	markWake chan struct{}
}

// New returns a Director.
func New(opts Options) *Director {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.NewRegistry()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Expiry == 0 {
		opts.Expiry = DefaultExpiry
	}
	return &Director{
		opts:      opts,
		log:       opts.Logger,
		published: opts.Metrics.Counter("edgefleet_controller_desired_published_total", "Desired states the broker acknowledged."),
		failed:    opts.Metrics.Counter("edgefleet_controller_desired_publish_failures_total", "Desired-state publishes that failed or timed out (they are retried after a reconnect)."),
		markWake:  make(chan struct{}, 1),
	}
}

// Run records the broker's acknowledgements in the store until ctx ends,
// and records the last ones before it returns.
func (d *Director) Run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			d.flushMarks()
			return nil
		case <-d.markWake:
			d.flushMarks()
		}
	}
}

func (d *Director) flushMarks() {
	d.markMu.Lock()
	batch := d.marks
	d.marks = nil
	d.markMu.Unlock()
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.opts.Store.MarkPublishedAll(ctx, batch); err != nil {
		// They stay unpublished in the store and are sent once more after
		// the next reconnect, which the agent ignores as already accepted.
		d.log.Error("record published desired states", "documents", len(batch), "err", err)
	}
}

// Issue runs commit with the director's document builder and publishes
// the desired states it returns, without waiting for the broker. commit
// must store them in one transaction (store.CommitRollout does) and return
// them; it runs under the publish lock, so documents reach the broker in
// generation order whoever issues them. Nothing is published if commit
// fails.
func (d *Director) Issue(ctx context.Context, commit func(build store.BuildFunc) ([]store.Desired, error)) ([]store.Desired, error) {
	d.pubMu.Lock()
	defer d.pubMu.Unlock()
	docs, err := commit(d.build)
	if err != nil {
		return nil, err
	}
	for _, doc := range docs {
		d.publish(doc, nil)
	}
	return docs, nil
}

// Result is the outcome of assigning to one device.
type Result struct {
	DeviceID   string
	Generation uint64
	// PublishErr is set if the broker did not acknowledge the desired
	// state; it is committed and will be published again after a reconnect.
	PublishErr error
}

// Assign installs model m into slot on every device in ids: one
// transaction bumps each device's generation and stores its new desired
// state, then each is published and the broker's acknowledgements are
// awaited until ctx ends. The error wraps store.ErrNotFound for an unknown
// device or model; publish failures are reported per device in the results.
func (d *Director) Assign(ctx context.Context, ids []string, slot string, m store.Model) ([]Result, error) {
	if slot == "" {
		slot = DefaultSlot
	}
	ds := store.DesiredSlot{Slot: slot, Model: m.Name, Version: m.Version, Digest: m.Digest, Size: m.Size}
	d.pubMu.Lock()
	docs, err := d.opts.Store.Assign(ctx, ids, ds, d.opts.Now(), d.build)
	if err != nil {
		d.pubMu.Unlock()
		return nil, err
	}
	results := make(chan Result, len(docs))
	for _, doc := range docs {
		d.publish(doc, func(err error) {
			results <- Result{DeviceID: doc.DeviceID, Generation: doc.Generation, PublishErr: err}
		})
	}
	d.pubMu.Unlock()
	d.log.Info("assigned model", "model", m.Name, "version", m.Version, "slot", slot, "devices", len(docs))

	byID := make(map[string]Result, len(docs))
	for range docs {
		select {
		case r := <-results:
			byID[r.DeviceID] = r
		case <-ctx.Done():
			// Committed: delivery goes on without us.
			return nil, fmt.Errorf("assignment stored, publishing still in progress: %w", ctx.Err())
		}
	}
	out := make([]Result, 0, len(docs))
	for _, doc := range docs {
		out = append(out, byID[doc.DeviceID])
	}
	return out, nil
}

// Republish publishes the stored desired state of device id again, without
// waiting for the broker. A device without a desired state is not an error.
func (d *Director) Republish(ctx context.Context, id string) error {
	d.pubMu.Lock()
	defer d.pubMu.Unlock()
	doc, err := d.opts.Store.DesiredState(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	d.publish(doc, nil)
	return nil
}

// RepublishPending publishes every desired state the broker has not
// acknowledged yet. The controller calls it after each (re)connect.
func (d *Director) RepublishPending(ctx context.Context) error {
	d.pubMu.Lock()
	defer d.pubMu.Unlock()
	docs, err := d.opts.Store.UnpublishedDesired(ctx)
	if err != nil {
		return err
	}
	for _, doc := range docs {
		d.publish(doc, nil)
	}
	if len(docs) > 0 {
		d.log.Info("re-published unacknowledged desired states", "devices", len(docs))
	}
	return nil
}

// build makes the document for a desired state the store is committing.
func (d *Director) build(ds *store.Desired) error {
	want := &pb.DesiredState{
		DeviceId:       ds.DeviceID,
		Generation:     ds.Generation,
		IssuedAtUnixMs: ds.IssuedAt.UnixMilli(),
	}
	if d.opts.Expiry > 0 {
		want.ExpiresAtUnixMs = ds.IssuedAt.Add(d.opts.Expiry).UnixMilli()
	}
	for _, s := range ds.Slots {
		if s.Slot == release.Slot {
			// An agent release, rolled out as a model in a pseudo slot
			// (controller/rollout/agent.go).
			want.AgentRelease = &pb.AgentRelease{Version: s.Version, Url: d.opts.ArtifactBaseURL + release.BasePath(s.Version),
				RolloutId: s.RolloutID, Rollback: s.Rollback}
			continue
		}
		a := &pb.SlotAssignment{
			Slot:      s.Slot,
			Model:     &pb.ModelRef{Name: s.Model, Version: s.Version, BundleSha256: s.Digest},
			Url:       d.opts.ArtifactBaseURL + ArtifactPath(s.Digest),
			Size:      s.Size,
			RolloutId: s.RolloutID,
			Rollback:  s.Rollback,
		}
		if h := s.Health; h != nil {
			a.Health = &pb.HealthPolicy{WatchMs: h.WatchMS, MaxErrorRate: h.MaxErrorRate, MaxLatencyP99Ms: h.MaxLatencyP99MS, MinInferences: h.MinInferences}
			if sp := h.Shadow; sp != nil {
				a.Shadow = &pb.ShadowPolicy{MinInferences: sp.MinInferences, MaxMs: sp.MaxMS, MinAgreement: sp.MinAgreement, Tolerance: sp.Tolerance, Hold: sp.Hold}
			}
		}
		want.Slots = append(want.Slots, a)
	}
	// The signature covers exactly these bytes, which is why they are
	// stored and re-sent rather than re-marshaled.
	inner, err := proto.MarshalOptions{Deterministic: true}.Marshal(want)
	if err != nil {
		return err
	}
	signed := &pb.SignedDesiredState{Desired: inner}
	if key := d.signingKey(); key != nil {
		sig := trust.Sign(key, trust.DomainDesiredState, inner)
		signed.Signature, signed.KeyId = sig.Sig, sig.KeyID
	}
	doc, err := proto.Marshal(signed)
	if err != nil {
		return err
	}
	ds.Doc = doc
	return nil
}

// publish seals and publishes one stored document; the caller holds pubMu.
// done, if not nil, gets the outcome after the bookkeeping.
func (d *Director) publish(doc store.Desired, done func(error)) {
	finish := func(err error) {
		if err != nil {
			d.failed.Inc()
			d.log.Warn("desired state not published; will retry after reconnect", "device", doc.DeviceID, "generation", doc.Generation, "err", err)
		} else {
			d.published.Inc()
			d.markMu.Lock()
			d.marks = append(d.marks, store.Published{DeviceID: doc.DeviceID, Generation: doc.Generation})
			d.markMu.Unlock()
			select {
			case d.markWake <- struct{}{}:
			default:
			}
		}
		if done != nil {
			done(err)
		}
	}
	var signed pb.SignedDesiredState
	if err := proto.Unmarshal(doc.Doc, &signed); err != nil {
		finish(fmt.Errorf("stored desired state of %s generation %d is corrupt: %w", doc.DeviceID, doc.Generation, err))
		return
	}
	payload, err := wire.Seal(doc.DeviceID, d.opts.Now(), &signed)
	if err != nil {
		finish(err)
		return
	}
	d.opts.Publisher.PublishAsync(wire.Topic(doc.DeviceID, wire.KindDesired), payload, true, finish)
}
