package deploy

import (
	"context"
	"errors"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// Model is one loaded model version, ready to serve. *host.Model is one;
// the fleet simulator hands out shared ones. Infer must be safe for
// concurrent use. The manager calls Close once, after the last call it
// started has returned.
type Model interface {
	Infer(ctx context.Context, in []tensor.Tensor) ([]tensor.Tensor, error)
	Manifest() *bundle.Manifest
	Close(ctx context.Context) error
}

// Loader turns a verified bundle into a Model: compile, instantiate, run
// the golden test vectors. An error refuses the bundle for good (the same
// digest is the same bytes), unless ctx ended.
//
// The fleet simulator passes one Loader to all its agents, deduplicating
// loaded models by b.Digest, so a thousand agents cost one instance pool.
type Loader interface {
	Load(ctx context.Context, b *bundle.Bundle) (Model, error)
}

// HostLoader loads models with a wazero host: the agent's default.
func HostLoader(h *host.Host) Loader { return hostLoader{h} }

type hostLoader struct{ h *host.Host }

// Precompiler is implemented by a Loader that can compile a module into
// its compilation cache ahead of Load (host.Host.Precompile), so that
// activation, the step that decides and switches, instantiates from a warm
// cache. The host loader does; the simulator's shared loader need not.
type Precompiler interface {
	Precompile(ctx context.Context, module []byte) error
}

func (l hostLoader) Precompile(ctx context.Context, module []byte) error {
	return l.h.Precompile(ctx, module)
}

func (l hostLoader) Load(ctx context.Context, b *bundle.Bundle) (Model, error) {
	m, err := l.h.Load(ctx, b)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// ErrNoModel is returned by Infer when no active model serves the name
// (or the version asked for is not the active one).
var ErrNoModel = errors.New("model not active on this device")

// Result is one inference answered by the active model of a slot.
type Result struct {
	// Slot, Model and Version name what answered: every output comes
	// from that one version, even across a switch.
	Slot, Model, Version string
	Outputs              []tensor.Tensor
	// Latency is the time the call took, waiting for an instance included.
	Latency time.Duration
}
