package agent

import (
	"github.com/edgefleet/edgefleet/agent/update"
)

// newUpdater builds the self-updater of an agent running from a binary:
// releases are checked against the configured release keys, and a
// rollback order may cross the agent's version floor only in a
// director-signed desired state.
func newUpdater(cfg Config, o Options, a *Agent) (*update.Updater, error) {
	release, err := readKeySet("release_keys", cfg.ReleaseKeys)
	if err != nil {
		return nil, err
	}
	return update.New(update.Options{
		DataDir: cfg.Data, Exe: o.Executable, Version: Version, Controller: cfg.Controller,
		Release: release, AllowUnsigned: cfg.AllowUnsigned,
		SignedRollbacks: len(cfg.DirectorKeys) > 0 && !cfg.AllowUnsigned,
		Deadline:        cfg.UpdateDeadline, RetryMin: o.RetryMin, RetryMax: o.RetryMax,
		Reporter: a, Logger: a.log, Desired: a.mgr.AgentRelease,
	})
}

// offerRelease tells the updater the accepted desired state may have
// changed; it reads it on its own goroutine (the manager may hold its
// locks when it calls StateChanged).
func (a *Agent) offerRelease() {
	if a.upd != nil {
		a.upd.Poke()
	}
}
