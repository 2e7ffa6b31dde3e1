package deploy

import (
	"context"
	"os"
	"slices"
	"sync"
	"testing"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/host"
)

// orderLoader is the real host loader, recording the order of its calls
// and how full the on-disk compilation cache was when Load began.
type orderLoader struct {
	Loader
	pre      Precompiler
	cacheDir string

	mu           sync.Mutex
	calls        []string
	cachedAtLoad int
}

func (l *orderLoader) Precompile(ctx context.Context, module []byte) error {
	l.mu.Lock()
	l.calls = append(l.calls, "precompile")
	l.mu.Unlock()
	return l.pre.Precompile(ctx, module)
}

func (l *orderLoader) Load(ctx context.Context, b *bundle.Bundle) (Model, error) {
	n := countFiles(l.cacheDir)
	l.mu.Lock()
	l.calls = append(l.calls, "load")
	l.cachedAtLoad = n
	l.mu.Unlock()
	return l.Loader.Load(ctx, b)
}

func countFiles(dir string) int {
	n := 0
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			n += countFiles(dir + "/" + e.Name())
		} else {
			n++
		}
	}
	return n
}

// TestPrecompileBeforeActivation: a downloaded, verified bundle's module is
// compiled into the on-disk cache before Load runs, so activation starts
// from a warm cache.
func TestPrecompileBeforeActivation(t *testing.T) {
	t.Parallel()
	spec, err := compiler.ReadSpec("../../models/examples/breast-cancer-risk")
	if err != nil {
		t.Fatal(err)
	}
	res, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	data, err := res.Bundle.Encode()
	if err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	h, err := host.New(t.Context(), host.Options{PoolSize: 1, CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(context.Background()) })
	hl := HostLoader(h)
	l := &orderLoader{Loader: hl, pre: hl.(Precompiler), cacheDir: cache}

	f := newFixture(t)
	a := f.publish("default", "breast-cancer-risk", "1.0.0", data)
	m, ev, _ := f.startWith(func(o *Options) { o.Host, o.Loader = nil, l })
	m.Offer(signed("dev-1", 1, a))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)

	l.mu.Lock()
	defer l.mu.Unlock()
	if !slices.Equal(l.calls, []string{"precompile", "load"}) {
		t.Fatalf("loader calls %v, want precompile then load", l.calls)
	}
	if l.cachedAtLoad == 0 {
		t.Fatal("the compilation cache was empty when activation began")
	}
}
