package agent

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
)

// ErrNoKeys is returned by New for an agent configured with neither
// --allow-unsigned nor both keys.
var ErrNoKeys = errors.New("no signing keys configured")

// guardFor builds the Guard cfg asks for: a deploy.TrustGuard over the
// configured keys. An agent without both keys refuses to start unless it
// is told --allow-unsigned: an agent that checks nothing installs any
// bundle and obeys any desired state, which must be a decision, not a
// default. With --allow-unsigned and no key at all it checks nothing
// (deploy.AllowAll), loudly.
func guardFor(cfg Config, log *slog.Logger) (deploy.Guard, error) {
	if !cfg.AllowUnsigned && (len(cfg.ReleaseKeys) == 0 || len(cfg.DirectorKeys) == 0) {
		var missing string
		switch {
		case len(cfg.ReleaseKeys) == 0 && len(cfg.DirectorKeys) == 0:
			missing = "no release key and no director key"
		case len(cfg.ReleaseKeys) == 0:
			missing = "no release key"
		default:
			missing = "no director key"
		}
		return nil, fmt.Errorf("%w: %s configured; pass --release-key FILE (release.pub from `fleet keys init`) and "+
			"--director-key FILE (the controller's DATA/keys/director.pub), or set release_keys and director_keys in the "+
			"config file; for development only, --allow-unsigned (EDGEFLEET_ALLOW_UNSIGNED=1) runs without them", ErrNoKeys, missing)
	}
	if len(cfg.ReleaseKeys) == 0 && len(cfg.DirectorKeys) == 0 {
		log.Error("--allow-unsigned and NO RELEASE OR DIRECTOR KEY CONFIGURED: this agent installs any bundle and obeys any desired state; " +
			"give it --release-key and --director-key before it leaves a lab")
		return deploy.AllowAll{}, nil
	}
	release, err := readKeySet("release_keys", cfg.ReleaseKeys)
	if err != nil {
		return nil, err
	}
	director, err := readKeySet("director_keys", cfg.DirectorKeys)
	if err != nil {
		return nil, err
	}
	if release == nil {
		log.Error("NO RELEASE KEY CONFIGURED: bundle signatures are not checked; set --release-key")
	}
	if director == nil {
		log.Error("NO DIRECTOR KEY CONFIGURED: desired-state signatures are not checked and rollback orders cannot cross the version floor; set --director-key")
	}
	if cfg.AllowUnsigned {
		log.Error("--allow-unsigned: UNSIGNED BUNDLES AND DESIRED STATES ARE ACCEPTED; development only")
	}
	g := &deploy.TrustGuard{Release: release, Director: director, AllowUnsigned: cfg.AllowUnsigned, DataDir: cfg.Data, Logger: log}
	// The effective sets include keys learnt from announcements
	// (DATA/trust.json); reading them now also fails the start on a
	// damaged file rather than at the first check.
	rel, err := g.KeySet(pb.KeyRole_KEY_ROLE_RELEASE)
	if err != nil {
		return nil, err
	}
	dir, err := g.KeySet(pb.KeyRole_KEY_ROLE_DIRECTOR)
	if err != nil {
		return nil, err
	}
	log.Info("signature checks on", "release_keys", ids(rel), "director_keys", ids(dir))
	return g, nil
}

func readKeySet(field string, files []string) (*trust.KeySet, error) {
	if len(files) == 0 {
		return nil, nil
	}
	pubs := make([]ed25519.PublicKey, 0, len(files))
	for _, f := range files {
		pub, err := trust.ReadPublicKey(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		pubs = append(pubs, pub)
	}
	return trust.NewKeySet(pubs...), nil
}

func ids(ks *trust.KeySet) []string {
	if ks == nil {
		return nil
	}
	return ks.IDs()
}

// keyRotation receives key announcements from the link and applies them
// on its own goroutine: applying one writes and syncs DATA/trust.json,
// which the MQTT client's goroutine must not wait for.
type keyRotation struct {
	in      chan *pb.KeyAnnouncements
	applied atomic.Uint64
	refused atomic.Uint64
}

func newKeyRotation() *keyRotation { return &keyRotation{in: make(chan *pb.KeyAnnouncements, 4)} }

// offerKeys hands an announcement chain on without blocking; when the queue
// is full it is dropped, since the broker redelivers the retained chain
// at the next reconnect and a newer chain holds every older announcement.
func (a *Agent) offerKeys(ka *pb.KeyAnnouncements) {
	select {
	case a.rot.in <- ka:
	default:
		a.log.Warn("key announcements dropped: too many waiting")
	}
}

// keysLoop applies announcements until ctx ends.
func (a *Agent) keysLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case ka := <-a.rot.in:
			a.applyKeys(ctx, ka)
		}
	}
}

func (a *Agent) applyKeys(ctx context.Context, ka *pb.KeyAnnouncements) {
	tg, ok := a.guard.(*deploy.TrustGuard)
	if !ok {
		a.log.Warn("key announcements ignored: this agent checks no signatures (--allow-unsigned without keys)", "announcements", len(ka.GetAnnouncements()))
		return
	}
	changes, err := tg.ApplyKeys(ka)
	director := false
	for _, c := range changes {
		a.rot.applied.Add(1)
		director = director || c.Role == "director"
	}
	if err != nil {
		a.rot.refused.Add(1)
		a.log.Error("key announcement refused", "err", err)
		a.Event(ctx, &pb.Event{Kind: pb.EventKind_EVENT_KIND_REFUSED, Detail: "key announcement refused: " + err.Error(), AtUnixMs: time.Now().UnixMilli()})
	}
	if director {
		// A desired state signed by the new key may have arrived before
		// its announcement (they travel on different topics).
		if sd := tg.TakePendingDesired(); sd != nil {
			a.log.Info("offering again the desired state refused before the key announcement")
			a.mgr.Offer(sd)
		}
	}
	if len(changes) > 0 {
		a.StateChanged()
	}
}

// writeKeyMetrics adds the trusted keys and announcement counters to
// /metrics.
func (a *Agent) writeKeyMetrics(w io.Writer) {
	fmt.Fprintf(w, "# HELP edgefleet_agent_key_announcements_applied_total Key announcements verified and applied.\n# TYPE edgefleet_agent_key_announcements_applied_total counter\nedgefleet_agent_key_announcements_applied_total %d\n", a.rot.applied.Load())
	fmt.Fprintf(w, "# HELP edgefleet_agent_key_announcements_refused_total Key announcement chains with a refused announcement (bad signature, unknown signer, replay).\n# TYPE edgefleet_agent_key_announcements_refused_total counter\nedgefleet_agent_key_announcements_refused_total %d\n", a.rot.refused.Load())
	tg, ok := a.guard.(*deploy.TrustGuard)
	if !ok {
		return
	}
	fmt.Fprintf(w, "# HELP edgefleet_agent_trusted_key A key this agent trusts now, by role.\n# TYPE edgefleet_agent_trusted_key gauge\n")
	for _, role := range []pb.KeyRole{pb.KeyRole_KEY_ROLE_RELEASE, pb.KeyRole_KEY_ROLE_DIRECTOR} {
		ks, err := tg.KeySet(role)
		if err != nil {
			continue
		}
		for _, id := range ids(ks) {
			fmt.Fprintf(w, "edgefleet_agent_trusted_key{role=%q,key=%q} 1\n", trust.RoleName(role), id)
		}
	}
}
