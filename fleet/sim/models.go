package sim

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// ErrSimulatedFailure is wrapped (with host.ErrGuest, as a model reporting
// an error would be) by every inference the simulator makes fail.
var ErrSimulatedFailure = errors.New("simulated model failure")

// models loads each bundle once for the whole simulated fleet: the first
// agent to load a digest compiles and tests it in the shared host, the
// others wait for it and share the loaded model (and its instance pool).
// The model is closed when the last agent using it closes it.
type models struct {
	host *host.Host

	mu       sync.Mutex
	byDigest map[string]*sharedModel
	loads    atomic.Uint64 // host loads, for Stats
}

// sharedModel is one loaded bundle and the agents holding it.
type sharedModel struct {
	digest string
	ready  chan struct{} // closed when m or err is set
	m      *host.Model
	err    error
	refs   int // guarded by models.mu
	// inputs are the requests the simulator sends this model: the
	// manifest's golden inputs, which the model is known to accept.
	inputs [][]tensor.Tensor
}

func newModels(h *host.Host) *models {
	return &models{host: h, byDigest: map[string]*sharedModel{}}
}

// acquire returns the loaded model of b, loading it if no agent holds it.
func (ms *models) acquire(ctx context.Context, b *bundle.Bundle) (*sharedModel, error) {
	ms.mu.Lock()
	sh := ms.byDigest[b.Digest]
	if sh == nil {
		sh = &sharedModel{digest: b.Digest, ready: make(chan struct{})}
		ms.byDigest[b.Digest] = sh
		sh.refs++
		ms.mu.Unlock()
		// Detached from the caller: the agent that happened to load first
		// may stop while others wait for the same model. The host bounds
		// the load itself (instantiation and test deadlines).
		ms.load(context.WithoutCancel(ctx), sh, b)
	} else {
		sh.refs++
		ms.mu.Unlock()
	}
	select {
	case <-sh.ready:
	case <-ctx.Done():
		ms.release(sh)
		return nil, ctx.Err()
	}
	if sh.err != nil {
		ms.release(sh)
		return nil, sh.err
	}
	return sh, nil
}

func (ms *models) load(ctx context.Context, sh *sharedModel, b *bundle.Bundle) {
	ms.loads.Add(1)
	m, err := ms.host.Load(ctx, b)
	var inputs [][]tensor.Tensor
	if err == nil {
		if inputs, err = sampleInputs(&b.Manifest); err != nil {
			m.Close(ctx)
			m = nil
		}
	}
	ms.mu.Lock()
	sh.m, sh.err, sh.inputs = m, err, inputs
	orphan := m != nil && sh.refs == 0 // every waiter gave up
	if orphan {
		delete(ms.byDigest, sh.digest)
	}
	ms.mu.Unlock()
	close(sh.ready)
	if orphan {
		m.Close(ctx)
	}
}

// release drops one agent's hold; the last one closes the model. A
// bundle that failed to load stays remembered (same digest, same bytes,
// same failure), so a thousand agents do not each retry it.
func (ms *models) release(sh *sharedModel) {
	ms.mu.Lock()
	sh.refs--
	last := sh.refs == 0 && sh.m != nil
	if last {
		delete(ms.byDigest, sh.digest)
	}
	ms.mu.Unlock()
	if last {
		sh.m.Close(context.Background())
	}
}

// loaded returns how many distinct bundles are loaded now.
func (ms *models) loaded() int {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	n := 0
	for _, sh := range ms.byDigest {
		if sh.m != nil {
			n++
		}
	}
	return n
}

// sampleInputs returns requests a model accepts: its golden test inputs,
// or, for a manifest without tests, zeros in the declared shapes with
// every free dimension 1.
func sampleInputs(man *bundle.Manifest) ([][]tensor.Tensor, error) {
	var out [][]tensor.Tensor
	for i, tv := range man.Tests {
		req := make([]tensor.Tensor, 0, len(tv.Inputs))
		for _, v := range tv.Inputs {
			d, err := tensor.ParseDType(v.Datatype)
			if err != nil {
				return nil, fmt.Errorf("model %s %s: test %d input %q: %w", man.Name, man.Version, i, v.Name, err)
			}
			t, err := tensor.FromFloat64(v.Name, d, v.Shape, v.Data)
			if err != nil {
				return nil, fmt.Errorf("model %s %s: test %d input %q: %w", man.Name, man.Version, i, v.Name, err)
			}
			req = append(req, t)
		}
		out = append(out, req)
	}
	if len(out) > 0 {
		return out, nil
	}
	req := make([]tensor.Tensor, 0, len(man.Inputs))
	for _, s := range man.Inputs {
		d, err := tensor.ParseDType(s.Datatype)
		if err != nil {
			return nil, fmt.Errorf("model %s %s: input %q: %w", man.Name, man.Version, s.Name, err)
		}
		shape := make([]int64, len(s.Shape))
		n := int64(1)
		for i, dim := range s.Shape {
			shape[i] = max(dim, 1)
			n *= shape[i]
		}
		if n*int64(d.Size()) > 1<<20 {
			return nil, fmt.Errorf("model %s %s: input %q of shape %v is over 1 MiB; add a golden test vector for the simulator to send", man.Name, man.Version, s.Name, s.Shape)
		}
		req = append(req, tensor.Tensor{Name: s.Name, DType: d, Shape: shape, Data: make([]byte, n*int64(d.Size()))})
	}
	return [][]tensor.Tensor{req}, nil
}

// FailSpec says which models fail on the failing agents: every model
// (empty), one model name, or one name@version.
type FailSpec string

func (f FailSpec) matches(man *bundle.Manifest) bool {
	if f == "" {
		return true
	}
	name, version, hasVersion := strings.Cut(string(f), "@")
	return man.Name == name && (!hasVersion || man.Version == version)
}

// loader is one simulated agent's agent.Loader: shared models, wrapped
// so the agent can fail its inferences and the simulator knows what the
// agent has loaded.
type loader struct {
	ms *models
	a  *Agent
}

func (l loader) Load(ctx context.Context, b *bundle.Bundle) (agent.Model, error) {
	sh, err := l.ms.acquire(ctx, b)
	if err != nil {
		return nil, err
	}
	m := &agentModel{sh: sh, ms: l.ms, a: l.a}
	if l.a.failing && l.a.sim.o.FailModel.matches(sh.m.Manifest()) {
		m.failRate = l.a.sim.o.FailRate
	}
	l.a.addModel(m)
	return m, nil
}

// agentModel is a shared model as one agent holds it.
type agentModel struct {
	sh       *sharedModel
	ms       *models
	a        *Agent
	failRate float64
	closed   atomic.Bool
}

func (m *agentModel) Infer(ctx context.Context, in []tensor.Tensor) ([]tensor.Tensor, error) {
	if m.failRate > 0 && rand.Float64() < m.failRate {
		man := m.sh.m.Manifest()
		return nil, fmt.Errorf("%w: %w: %s %s on a device chosen to fail (fleet sim --fail)", host.ErrGuest, ErrSimulatedFailure, man.Name, man.Version)
	}
	return m.sh.m.Infer(ctx, in)
}

func (m *agentModel) Manifest() *bundle.Manifest { return m.sh.m.Manifest() }

func (m *agentModel) Close(context.Context) error {
	if m.closed.Swap(true) {
		return nil
	}
	m.a.dropModel(m)
	m.ms.release(m.sh)
	return nil
}

// request returns one of the model's sample requests.
func (m *agentModel) request() []tensor.Tensor {
	in := m.sh.inputs
	return in[rand.IntN(len(in))]
}
