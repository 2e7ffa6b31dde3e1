package deploy

import (
	"context"
	"log/slog"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
)

// precompile compiles a verified bundle's module into the loader's
// compilation cache (on disk on a device) as soon as the bundle has landed,
// so Load, the activation step, instantiates from a warm cache instead of
// running the compiler. It runs after the load attempt is recorded: a
// compiler crash on a hostile module counts against the bundle like a
// crash in Load. A failure is only logged; Load then compiles again and
// gives the error that refuses the bundle. Loaders without a cache (the
// simulator's shared one) skip it.
func (m *Manager) precompile(ctx context.Context, log *slog.Logger, b *bundle.Bundle) {
	p, ok := m.o.Loader.(Precompiler)
	if !ok {
		return
	}
	start := time.Now()
	if err := p.Precompile(ctx, b.Module); err != nil {
		log.Warn("precompiling the module failed; activation compiles it", "err", err)
		return
	}
	log.Debug("module precompiled into the compilation cache", "took", time.Since(start))
}
