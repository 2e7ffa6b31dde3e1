package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/agent/update"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
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
		Reporter: a, Logger: a.log, Desired: a.mgr.AgentRelease, Prewarm: a.prewarm,
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

// traceServing marks that the local endpoint serves. After a self-update
// the restart trace now waits for the first answer; at any other start
// its steps are logged now, the baseline a restart compares with.
func (a *Agent) traceServing() {
	t := a.o.RestartTrace
	t.Mark(update.StepServing)
	if t.Has(update.StepExec) {
		a.traceOpen.Store(true)
		return
	}
	t.Report(a.log, "agent start timing")
}

// traceAnswered closes a restart trace at the first answer after an exec
// and logs it.
func (a *Agent) traceAnswered() {
	if a.traceOpen.CompareAndSwap(true, false) {
		a.o.RestartTrace.Mark(update.StepFirstAnswer)
		a.o.RestartTrace.Report(a.log, "self-update restart timing")
	}
}

// traceStopping marks the local endpoint's stop; a trace still waiting
// for its first answer is logged without it first.
func (a *Agent) traceStopping() {
	if a.traceOpen.CompareAndSwap(true, false) {
		a.o.RestartTrace.Report(a.log, "self-update restart timing")
	}
	a.o.RestartTrace.Mark(update.StepStopServing)
}

// openParts opens the spool (unless Options gave one), makes the model
// host and restores the models from disk. The spool opens on its own
// goroutine while the models load: after a self-update's exec both stand
// between the handed-over socket and the first answer, and a spool's
// open (SQLite recovery, schema) is mostly waiting on the disk while a
// model's is mostly CPU. It returns the spool it opened, which the caller
// closes with closeParts even when it also returns an error.
func (a *Agent) openParts(ctx context.Context) (*spool.SQLite, error) {
	type opened struct {
		db  *spool.SQLite
		err error
	}
	spoolc := make(chan opened, 1)
	if a.o.Spool == nil {
		go func() {
			db, err := openSpool(ctx, filepath.Join(a.cfg.Data, SpoolFile), a.cfg)
			a.o.RestartTrace.Mark(update.StepSpoolOpened)
			spoolc <- opened{db, err}
		}()
	} else {
		spoolc <- opened{}
	}
	err := a.restoreModels(ctx)
	sp := <-spoolc // always joined: no goroutine outlives openParts
	a.spool = a.o.Spool
	if sp.db != nil {
		a.spool = sp.db
	}
	if sp.err != nil {
		return sp.db, sp.err
	}
	return sp.db, err
}

// restoreModels makes the agent's own host (when Options gave no Loader
// or Host) and restores the models from disk.
func (a *Agent) restoreModels(ctx context.Context) error {
	if a.own != nil {
		h, err := host.New(ctx, host.Options{CacheDir: filepath.Join(a.cfg.Data, CacheDir), Logger: a.log})
		if err != nil {
			return err
		}
		a.own.h = h
	}
	a.o.RestartTrace.Mark(update.StepHostReady)
	if err := a.mgr.Restore(ctx); err != nil {
		return err
	}
	a.o.RestartTrace.Mark(update.StepRestored)
	return nil
}

// closeParts closes what openParts opened: the models and the host on
// this goroutine, the spool (whose close checkpoints and syncs its WAL)
// at the same time on another, since neither waits for the other and a
// self-update's restart waits for both.
func (a *Agent) closeParts(ctx context.Context, db *spool.SQLite) {
	var wg sync.WaitGroup
	if db != nil {
		wg.Go(func() { db.Close() })
	}
	a.mgr.Close(ctx)
	if a.own != nil && a.own.h != nil {
		a.own.h.Close(ctx)
	}
	wg.Wait()
}

// maxPrecompile caps the bundles one precompile run compiles: a device
// has an active and maybe a previous model per slot.
const maxPrecompile = 32

// prewarm has the staged new binary exe compile the models this agent
// serves into the compilation cache with its own wazero, while this
// process still serves them: the new process then restores them from a
// warm cache, even when the release carries another wazero (whose cache
// is a directory of its own), instead of compiling in the restart's gap.
func (a *Agent) prewarm(ctx context.Context, exe string) error {
	var digests []string
	seen := map[string]bool{}
	for _, s := range a.mgr.Slots() {
		for _, ref := range []*pb.ModelRef{s.GetActive(), s.GetPrevious()} {
			if d := ref.GetBundleSha256(); d != "" && !seen[d] && len(digests) < maxPrecompile {
				seen[d] = true
				digests = append(digests, d)
			}
		}
	}
	if len(digests) == 0 {
		return nil
	}
	return update.RunPrecompile(ctx, exe, a.cfg.Data, digests)
}

// PrecompileStored compiles the modules of the stored bundles named by
// digests (DATA/bundles/DIGEST.bundle) into the compilation cache under
// dataDir, with this binary's wazero: what `fleet-agent precompile` does
// for a running agent about to be replaced by this binary. The bundles
// were verified when the running agent stored and loaded them; each file
// is checked against its digest here, so a damaged one is skipped.
func PrecompileStored(ctx context.Context, dataDir string, digests []string) error {
	if len(digests) > maxPrecompile {
		return fmt.Errorf("%d bundles to precompile, over the cap of %d", len(digests), maxPrecompile)
	}
	h, err := host.New(ctx, host.Options{CacheDir: filepath.Join(dataDir, CacheDir)})
	if err != nil {
		return err
	}
	defer h.Close(context.WithoutCancel(ctx))
	var errs []error
	for _, d := range digests {
		if err := precompileStored(ctx, h, dataDir, d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func precompileStored(ctx context.Context, h *host.Host, dataDir, digest string) error {
	if len(digest) != sha256.Size*2 || strings.Trim(digest, "0123456789abcdef") != "" {
		return fmt.Errorf("bundle digest %q: want 64 lowercase hex digits", digest)
	}
	path := filepath.Join(dataDir, deploy.BundlesDir, digest+".bundle")
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, bundle.MaxBundleSize+1))
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != digest {
		return fmt.Errorf("stored bundle %s does not match its digest; the agent downloads it again", path)
	}
	b, err := bundle.Decode(data)
	if err != nil {
		return fmt.Errorf("stored bundle %s: %w", path, err)
	}
	return h.Precompile(ctx, b.Module)
}
