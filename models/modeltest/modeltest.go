// Package modeltest gives other packages' tests real model bundles, built
// from the example sources under models/examples and the misbehaving test
// models under models/examples/testmodels, and real guest modules built
// from any Go guest package (such as a test's testdata guest).
//
// Builds are cached under os.UserCacheDir()/edgefleet-test-models (or
// $EDGEFLEET_TEST_MODELS_CACHE), keyed by a hash of the sources, the
// version and the Go version, so only the first run after a change pays
// for compiling to WebAssembly. Concurrent test processes are safe.
package modeltest

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/examples/testmodels"
)

// CacheEnv names the environment variable that overrides the cache dir.
const CacheEnv = "EDGEFLEET_TEST_MODELS_CACHE"

// buildTimeout bounds one guest build: a cold Go build cache for wasip1
// takes well under a minute on two cores.
const buildTimeout = 5 * time.Minute

// CacheDir returns the directory where built guests are cached.
func CacheDir() string {
	if d := os.Getenv(CacheEnv); d != "" {
		return d
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	return filepath.Join(base, "edgefleet-test-models")
}

var (
	rootOnce sync.Once
	root     string
	rootErr  error
)

func builder(t testing.TB) *build.Builder {
	t.Helper()
	rootOnce.Do(func() {
		wd, err := os.Getwd()
		if err != nil {
			rootErr = err
			return
		}
		root, rootErr = build.FindRoot(wd)
	})
	if rootErr != nil {
		t.Fatalf("modeltest: %v", rootErr)
	}
	return &build.Builder{Root: root, CacheDir: CacheDir()}
}

// ExampleBundle builds models/examples/<name> at version into a bundle
// (module, manifest with inputs, outputs, limits and golden vectors). A
// version only the test models have (such as grid-anomaly 1.2.0-slow, see
// models/examples/testmodels) is built from there, so a test can roll a
// misbehaving variant out like any other version. It fails the test if
// the example or the version does not exist or does not build.
func ExampleBundle(t testing.TB, name, version string) *bundle.Bundle {
	t.Helper()
	b := builder(t)
	if !exampleHas(b.Root, name, version) && testmodels.Has(b.Root, name, version) {
		return TestModelBundle(t, name, version)
	}
	return built(t, "example", name, version, b.Example)
}

// TestModelBundle builds test model name at version from
// models/examples/testmodels (for example "grid-anomaly", testmodels.Loop)
// into a bundle.
func TestModelBundle(t testing.TB, name, version string) *bundle.Bundle {
	t.Helper()
	b := builder(t)
	return built(t, "testmodel", name, version, func(ctx context.Context, name, version string) (*bundle.Bundle, error) {
		return testmodels.Build(ctx, b, name, version)
	})
}

// BuildTestModel is TestModelBundle encoded: the bytes of a bundle file.
func BuildTestModel(t testing.TB, name, version string) []byte {
	t.Helper()
	data, err := TestModelBundle(t, name, version).Encode()
	if err != nil {
		t.Fatalf("modeltest: encode bundle %s %s: %v", name, version, err)
	}
	return data
}

func exampleHas(root, name, version string) bool {
	_, err := os.Stat(filepath.Join(root, build.ExamplesDir, name, "golden-"+version+".json"))
	return err == nil
}

// built returns the bundle make builds, through the process memo and the
// precompiled code cache.
func built(t testing.TB, kind, name, version string, make func(ctx context.Context, name, version string) (*bundle.Bundle, error)) *bundle.Bundle {
	t.Helper()
	key := kind + "\x00" + name + "\x00" + version
	if data, ok := memo.Load(key); ok {
		return decode(t, data.([]byte))
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	b, err := make(ctx, name, version)
	if err != nil {
		t.Fatalf("modeltest: %v", err)
	}
	Precompile(t, b.Module)
	data, err := b.Encode()
	if err != nil {
		t.Fatalf("modeltest: encode bundle %s %s: %v", name, version, err)
	}
	memo.Store(key, data)
	return decode(t, data)
}

// memo keeps what this process built: sources do not change under a
// running test binary, and asking the go command costs a few hundred
// milliseconds a call. Callers get copies, so they may modify them.
var memo sync.Map

func decode(t testing.TB, data []byte) *bundle.Bundle {
	t.Helper()
	b, err := bundle.Decode(data)
	if err != nil {
		t.Fatalf("modeltest: %v", err)
	}
	return b
}

// BuildExample is ExampleBundle encoded: the bytes of a bundle file, as an
// agent downloads it.
func BuildExample(t testing.TB, name, version string) []byte {
	t.Helper()
	data, err := ExampleBundle(t, name, version).Encode()
	if err != nil {
		t.Fatalf("modeltest: encode bundle %s %s: %v", name, version, err)
	}
	return data
}

// BuildGuest compiles the Go guest package in dir (absolute, or relative to
// the test's working directory, e.g. "testdata/spin") to a wasip1 reactor
// module with main.version set to version, and returns the .wasm bytes.
func BuildGuest(t testing.TB, dir, version string) []byte {
	t.Helper()
	b := builder(t)
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	key := "guest\x00" + abs + "\x00" + version
	if mod, ok := memo.Load(key); ok {
		return append([]byte(nil), mod.([]byte)...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	mod, err := b.Module(ctx, abs, version)
	if err != nil {
		t.Fatalf("modeltest: %v", err)
	}
	Precompile(t, mod)
	memo.Store(key, mod)
	return append([]byte(nil), mod...)
}

// Bundle packs module with manifest m (ABI, module digest and size are
// filled in; ABI defaults to 1) and fails the test on error. Tests use it
// to make bundles with tampered manifests, such as a wrong golden vector.
func Bundle(t testing.TB, m bundle.Manifest, module []byte) *bundle.Bundle {
	t.Helper()
	if m.ABI == 0 {
		m.ABI = build.ABIVersion
	}
	b, err := bundle.New(m, module)
	if err != nil {
		t.Fatalf("modeltest: %v", err)
	}
	return b
}
