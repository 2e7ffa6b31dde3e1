package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

// Renewals: a desired state expires (Options.Expiry, 30 days by default)
// so that a device cannot be frozen on a stale instruction, and an agent
// refuses an expired one. A device whose orders do not change for that
// long would then refuse its own current state the next time it is
// offered it (after a restart of the agent with a lost desired.pb, a new
// device file system, or simply a device that was away longer than the
// expiry). The Renewer re-issues every stored desired state whose expiry
// is within its horizon before that happens: same slots, the next
// generation, a fresh issue time and expiry, and renews_generation naming
// the generation whose orders it repeats, so the agent keeps refusing
// what it refused under them (agent/deploy.OrdersGeneration).
//
// Crash safety is the director's: each batch of renewals is committed to
// the store (generation and document in one transaction) before it is
// published, and a document the broker did not acknowledge is published
// again after the next (re)connect (RepublishPending).

// DefaultRenewBefore is how long before its expiry a desired state is
// renewed.
const DefaultRenewBefore = 7 * 24 * time.Hour

// DefaultRenewInterval is how often the Renewer looks for desired states
// to renew.
const DefaultRenewInterval = time.Hour

// defaultRenewBatch bounds the devices renewed in one transaction.
const defaultRenewBatch = 500

// RenewStore is what the Renewer needs from the controller's store.
type RenewStore interface {
	// DesiredDocs returns every device's current desired state (without
	// its slots).
	DesiredDocs(ctx context.Context) ([]store.Desired, error)
	// IssueDesired commits new generations of the devices' desired states.
	IssueDesired(ctx context.Context, changes []store.SlotChange, issued time.Time, build store.BuildFunc) ([]store.Desired, error)
}

// RenewOptions configure a Renewer. Store is required.
type RenewOptions struct {
	Store RenewStore
	// Before is how long before its expiry a desired state is renewed
	// (DefaultRenewBefore); it must be shorter than the director's expiry,
	// or every renewal would be due again at once.
	Before time.Duration
	// Interval is how often Run looks (DefaultRenewInterval).
	Interval time.Duration
	// Batch bounds the devices renewed in one transaction (500).
	Batch int
}

// Renewer re-issues desired states before they expire. Make it with
// (*Director).NewRenewer and run it with Run.
type Renewer struct {
	d       *Director
	o       RenewOptions
	log     *slog.Logger
	renewed *metrics.Counter
}

// NewRenewer returns the director's Renewer. It refuses a horizon that is
// not shorter than the director's expiry. With expiry off (a negative
// Options.Expiry) nothing ever expires and Run only waits.
func (d *Director) NewRenewer(o RenewOptions) (*Renewer, error) {
	if o.Store == nil {
		return nil, errors.New("director: the renewer needs a store")
	}
	if o.Before <= 0 {
		o.Before = DefaultRenewBefore
	}
	if o.Interval <= 0 {
		o.Interval = DefaultRenewInterval
	}
	if o.Batch <= 0 {
		o.Batch = defaultRenewBatch
	}
	if d.opts.Expiry > 0 && o.Before >= d.opts.Expiry {
		return nil, fmt.Errorf("desired states are renewed %s before they expire, but they are valid for only %s; renew them less early", o.Before, d.opts.Expiry)
	}
	return &Renewer{d: d, o: o, log: d.log.With("part", "renewer"),
		renewed: d.opts.Metrics.Counter("edgefleet_controller_desired_renewed_total", "Desired states re-issued because their expiry was near.")}, nil
}

// Run renews what is due now and then every Interval, until ctx ends. A
// failed pass is logged and tried again at the next one.
func (r *Renewer) Run(ctx context.Context) error {
	if r.d.opts.Expiry < 0 {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(r.o.Interval)
	defer t.Stop()
	for {
		if _, err := r.Once(ctx); err != nil && ctx.Err() == nil {
			r.log.Error("renewing desired states before they expire; trying again later", "err", err, "retry_in", r.o.Interval)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Once renews every desired state that expires within the horizon (or has
// expired already: a device away for longer than the expiry gets a valid
// one), and returns how many it renewed.
func (r *Renewer) Once(ctx context.Context) (int, error) {
	total := 0
	// A device is renewed at most once a pass, whatever the store says
	// afterwards: a pass always ends.
	done := map[string]bool{}
	for {
		n, more, err := r.batch(ctx, done)
		total += n
		if err != nil || !more {
			return total, err
		}
	}
}

// batch renews up to Batch due desired states in one transaction and
// reports whether more may be due. It reads, commits and publishes under
// the director's publish lock (Issue), like every other issuer, so no
// order can be committed between reading a document and renewing it: a
// renewal always repeats the orders of the document it read.
func (r *Renewer) batch(ctx context.Context, done map[string]bool) (n int, more bool, err error) {
	now := r.d.opts.Now()
	_, err = r.d.Issue(ctx, func(build store.BuildFunc) ([]store.Desired, error) {
		docs, err := r.o.Store.DesiredDocs(ctx)
		if err != nil {
			return nil, err
		}
		orders := map[string]uint64{}
		var changes []store.SlotChange
		for _, doc := range docs {
			ordersGen, exp, err := docTerms(doc)
			if err != nil {
				// Renewing would sign whatever the store now holds; leave
				// it to the operator, loudly.
				r.log.Error("cannot read a stored desired state to renew it", "device", doc.DeviceID, "generation", doc.Generation, "err", err)
				continue
			}
			if exp.IsZero() || exp.Sub(now) > r.o.Before || done[doc.DeviceID] {
				continue
			}
			if len(changes) == r.o.Batch {
				more = true
				break
			}
			orders[doc.DeviceID] = ordersGen
			done[doc.DeviceID] = true
			// A change of no slot: the store takes the next generation
			// and rebuilds the document from the slots it holds, in the
			// same transaction.
			changes = append(changes, store.SlotChange{DeviceID: doc.DeviceID})
		}
		if len(changes) == 0 {
			return nil, nil
		}
		out, err := r.o.Store.IssueDesired(ctx, changes, now, r.renewal(build, orders))
		if err != nil {
			return nil, fmt.Errorf("renew %d desired states: %w", len(changes), err)
		}
		n = len(out)
		return out, nil
	})
	if err != nil {
		return 0, false, err
	}
	if n > 0 {
		r.renewed.Add(uint64(n))
		r.log.Info("renewed desired states before their expiry", "devices", n, "expiry", now.Add(r.d.opts.Expiry).UTC().Format(time.RFC3339))
	}
	return n, more, nil
}

// renewal wraps the director's document builder: the document it builds
// also names the generation whose orders it renews, and is signed again
// over the bytes that include it.
func (r *Renewer) renewal(build store.BuildFunc, orders map[string]uint64) store.BuildFunc {
	return func(ds *store.Desired) error {
		if err := build(ds); err != nil {
			return err
		}
		var signed pb.SignedDesiredState
		if err := proto.Unmarshal(ds.Doc, &signed); err != nil {
			return err
		}
		var want pb.DesiredState
		if err := proto.Unmarshal(signed.GetDesired(), &want); err != nil {
			return err
		}
		if g := orders[ds.DeviceID]; g > 0 && g < ds.Generation {
			want.RenewsGeneration = g
		}
		inner, err := proto.MarshalOptions{Deterministic: true}.Marshal(&want)
		if err != nil {
			return err
		}
		signed = pb.SignedDesiredState{Desired: inner}
		if key := r.d.signingKey(); key != nil {
			sig := trust.Sign(key, trust.DomainDesiredState, inner)
			signed.Signature, signed.KeyId = sig.Sig, sig.KeyID
		}
		doc, err := proto.Marshal(&signed)
		if err != nil {
			return err
		}
		ds.Doc = doc
		return nil
	}
}

// docTerms reads a stored document's orders generation (its own, or the
// one it renews) and expiry (zero: none).
func docTerms(doc store.Desired) (orders uint64, expires time.Time, err error) {
	var signed pb.SignedDesiredState
	if err := proto.Unmarshal(doc.Doc, &signed); err != nil {
		return 0, time.Time{}, err
	}
	var ds pb.DesiredState
	if err := proto.Unmarshal(signed.GetDesired(), &ds); err != nil {
		return 0, time.Time{}, err
	}
	orders = ds.GetGeneration()
	if g := ds.GetRenewsGeneration(); g > 0 && g < orders {
		orders = g
	}
	if ms := ds.GetExpiresAtUnixMs(); ms != 0 {
		expires = time.UnixMilli(ms)
	}
	return orders, expires, nil
}
