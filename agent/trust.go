package agent

import (
	"crypto/ed25519"
	"fmt"
	"log/slog"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/proto/trust"
)

// guardFor builds the Guard cfg asks for: a deploy.TrustGuard over the
// configured keys, or, with no key at all, deploy.AllowAll and a loud
// warning. Running unchecked is the default so a fresh checkout's demo
// runs; a device in the field must be given both keys (see SECURITY.md).
func guardFor(cfg Config, log *slog.Logger) (deploy.Guard, error) {
	if len(cfg.ReleaseKeys) == 0 && len(cfg.DirectorKeys) == 0 {
		log.Error("NO RELEASE OR DIRECTOR KEY CONFIGURED: this agent installs any bundle and obeys any desired state; " +
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
	log.Info("signature checks on", "release_keys", ids(release), "director_keys", ids(director))
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
