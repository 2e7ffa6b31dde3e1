// Package host runs model bundles: it compiles a bundle's WebAssembly module
// with wazero, checks that it speaks Model ABI v1 (models/ABI.md) and
// reproduces its golden test vectors, and then serves inferences from a
// pool of sandboxed instances, each call bounded in time and memory.
//
// Load refuses a bundle at its first problem; Check reports all of them.
// A loaded Model counts what happens to it (Stats), replaces an instance
// that trapped or ran out of time, and can be kept cheaply for a rollback
// (ReleaseIdle, then Warm) or retired without failing the calls it is
// serving (Drain).
//
// The agent and the fleet CLI (`fleet model predict`, `fleet model check`)
// both use this package, so a model behaves the same on a laptop as on a
// device.
package host

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"github.com/tetratelabs/wazero"
)

// ABIVersion is the Model ABI version this host implements.
const ABIVersion = 1

// SupportedABIs lists every Model ABI version this host can run. A bundle or
// module asking for another version is refused with an error naming these.
var SupportedABIs = []uint32{1}

// Errors that callers branch on. Every error Infer returns wraps exactly one
// of them (or the caller's context error).
var (
	// ErrTimeout: the call outlived its deadline and was stopped.
	ErrTimeout = errors.New("model inference timed out")
	// ErrGuest: the model itself reported an error (ef_infer returned < 0).
	ErrGuest = errors.New("model reported an error")
	// ErrBadInput: the input does not match the model's declared inputs,
	// either by the host's check or by the guest's (code -1). Answer it as
	// a client error (HTTP 400).
	ErrBadInput = errors.New("bad model input")
	// ErrTrap: the module trapped, exited or ran out of memory.
	ErrTrap = errors.New("model trapped")
	// ErrClosed: the model or host was closed.
	ErrClosed = errors.New("model closed")
	// ErrRefused wraps every reason Load refuses a bundle.
	ErrRefused = errors.New("model refused")
)

// Defaults for zero Options fields.
const (
	DefaultMaxMemoryPages = 1024 // 64 MiB
	DefaultTimeout        = time.Second
	// instantiateTimeout bounds a module's _initialize: a guest that never
	// finishes starting must not hang the agent.
	instantiateTimeout = 30 * time.Second
)

// Options configure a Host.
type Options struct {
	// CacheDir holds wazero's compilation cache on disk, so a module is
	// compiled once per device rather than once per start; "" keeps the
	// cache in memory only.
	CacheDir string
	// MaxMemoryPages caps each instance's linear memory in 64 KiB pages. A
	// manifest may ask for less, never more. Default 1024 (64 MiB).
	MaxMemoryPages uint32
	// DefaultTimeout is the per-inference deadline when the manifest sets
	// none. Default 1s.
	DefaultTimeout time.Duration
	// PoolSize is the most instances per model, hence the most concurrent
	// inferences per model. Default runtime.NumCPU().
	PoolSize int
	// Logger receives load events and guest stderr. Default: discard.
	Logger *slog.Logger
}

func (o *Options) fill() error {
	if o.MaxMemoryPages == 0 {
		o.MaxMemoryPages = DefaultMaxMemoryPages
	}
	if o.MaxMemoryPages > 65536 {
		return fmt.Errorf("host: MaxMemoryPages %d is over the WebAssembly limit of 65536 pages (4 GiB)", o.MaxMemoryPages)
	}
	if o.DefaultTimeout <= 0 {
		o.DefaultTimeout = DefaultTimeout
	}
	if o.PoolSize <= 0 {
		o.PoolSize = runtime.NumCPU()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return nil
}

// Host loads and runs models. It is safe for concurrent use.
type Host struct {
	opts  Options
	cache wazero.CompilationCache
	log   *slog.Logger

	mu     sync.Mutex
	models map[*Model]struct{}
	closed bool
	// busy counts Loads and Precompiles in progress; Close waits for them
	// before closing the cache they compile into.
	busy sync.WaitGroup
}

// New returns a Host. With a CacheDir, compiled modules persist there across
// processes (the directory is created if missing).
func New(ctx context.Context, o Options) (*Host, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	var cache wazero.CompilationCache
	if o.CacheDir != "" {
		c, err := wazero.NewCompilationCacheWithDir(o.CacheDir)
		if err != nil {
			return nil, fmt.Errorf("host: compilation cache in %s: %w; check the directory is writable or set another", o.CacheDir, err)
		}
		cache = c
	} else {
		cache = wazero.NewCompilationCache()
	}
	return &Host{opts: o, cache: cache, log: o.Logger, models: map[*Model]struct{}{}}, nil
}

// Close closes every model still loaded and releases the compilation cache
// (the files of an on-disk cache stay).
func (h *Host) Close(ctx context.Context) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	h.mu.Unlock()
	h.busy.Wait()
	h.mu.Lock()
	models := make([]*Model, 0, len(h.models))
	for m := range h.models {
		models = append(models, m)
	}
	h.mu.Unlock()
	var errs []error
	for _, m := range models {
		errs = append(errs, m.Close(ctx))
	}
	errs = append(errs, h.cache.Close(ctx))
	return errors.Join(errs...)
}

// begin registers a Load or Precompile, refusing once the host is closed;
// the caller must call h.busy.Done when finished.
func (h *Host) begin() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return fmt.Errorf("%w: the host is closed", ErrClosed)
	}
	h.busy.Add(1)
	return nil
}

func (h *Host) add(m *Model) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.models[m] = struct{}{}
}

func (h *Host) remove(m *Model) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.models, m)
}

func abiSupported(v uint32) bool {
	for _, s := range SupportedABIs {
		if s == v {
			return true
		}
	}
	return false
}

// Precompile compiles module into the host's compilation cache without
// running it, so that a later Load of a bundle holding it skips the
// compiler. The agent can call it right after a download, long before
// activation. With an in-memory cache (no CacheDir) nothing is kept and
// Precompile only checks that the module compiles.
func (h *Host) Precompile(ctx context.Context, module []byte) error {
	if err := h.begin(); err != nil {
		return err
	}
	defer h.busy.Done()
	rt := wazero.NewRuntimeWithConfig(ctx, h.runtimeConfig(h.opts.MaxMemoryPages))
	defer rt.Close(context.WithoutCancel(ctx))
	c, err := rt.CompileModule(ctx, module)
	if err != nil {
		return fmt.Errorf("%w: module does not compile: %v", ErrRefused, err)
	}
	return c.Close(ctx)
}

// runtimeConfig is the one wazero configuration of every runtime of this
// host. Load and Precompile must agree on it, or the cache would miss:
// WithCloseOnContextDone changes the compiled code.
func (h *Host) runtimeConfig(pages uint32) wazero.RuntimeConfig {
	return wazero.NewRuntimeConfig().
		WithCompilationCache(h.cache).
		WithCloseOnContextDone(true).
		WithMemoryLimitPages(pages)
}
