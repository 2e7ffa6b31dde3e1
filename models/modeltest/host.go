package modeltest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/host"
)

// CompilationCacheDir is the wazero compilation cache shared by every test
// of every package. Compiling a Go guest costs about 2 s (over 20 s under
// -race); with the shared cache a test pays it once per module, ever.
func CompilationCacheDir() string {
	return filepath.Join(CacheDir(), "wazero")
}

// NewHost returns a host.Host for a test: o's zero fields get the shared
// CompilationCacheDir and a logger writing to t.Log; the host is closed
// when the test ends.
func NewHost(t testing.TB, o host.Options) *host.Host {
	t.Helper()
	if o.CacheDir == "" {
		o.CacheDir = CompilationCacheDir()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	ctx := context.Background()
	h, err := host.New(ctx, o)
	if err != nil {
		t.Fatalf("modeltest: %v", err)
	}
	t.Cleanup(func() { _ = h.Close(context.Background()) })
	return h
}

// testWriter sends log lines to t.Log. A line logged after the test ended
// (by a goroutine still winding down) is dropped instead of panicking.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (n int, err error) {
	defer func() { _ = recover() }()
	n = len(p)
	w.t.Log(string(p[:len(p)-min(1, len(p))]))
	return n, nil
}

// Precompile puts module's machine code into CompilationCacheDir. Under
// -race it does so in a helper process built without the race detector
// (once per module: a marker file remembers it); otherwise it does
// nothing, since the host compiles at full speed and fills the cache
// itself. ExampleBundle and BuildGuest call it, so tests rarely need to.
func Precompile(t testing.TB, module []byte) {
	t.Helper()
	if !raceEnabled {
		return
	}
	b := builder(t)
	sum := sha256.New()
	sum.Write(module)
	if gosum, err := os.ReadFile(filepath.Join(b.Root, "go.sum")); err == nil {
		sum.Write(gosum) // a different wazero compiles differently
	}
	marker := filepath.Join(CacheDir(), "wazero-warm", hex.EncodeToString(sum.Sum(nil))[:32])
	if _, err := os.Stat(marker); err == nil {
		return
	}
	tmp := t.TempDir()
	path := filepath.Join(tmp, "module.wasm")
	if err := os.WriteFile(path, module, 0o644); err != nil {
		t.Fatal(err)
	}
	// wazero keys its cache directory by the version it reads from the
	// build info, which test binaries lack: hand the helper the same one.
	cmd := exec.Command("go", "run", "-ldflags", "-X github.com/tetratelabs/wazero/internal/version.version="+wazeroVersion(),
		"./models/modeltest/internal/precompile", "-cache", CompilationCacheDir(), path)
	cmd.Dir = b.Root
	cmd.Env = hostEnv()
	if out, err := cmd.CombinedOutput(); err != nil {
		// Not fatal: the host compiles in-process, only slower.
		t.Logf("modeltest: precompile without -race failed, the host will compile in-process: %v\n%s", err, out)
		return
	}
	if err := os.MkdirAll(filepath.Dir(marker), 0o755); err == nil {
		_ = os.WriteFile(marker, nil, 0o644)
	}
}

// wazeroVersion mirrors how wazero names its cache directory: the wazero
// dependency's version in the build info, else the main module's, else
// "dev".
func wazeroVersion() string {
	v := ""
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, d := range info.Deps {
			if strings.Contains(d.Path, "github.com/tetratelabs/wazero") {
				v = d.Version
			}
		}
		if v == "" || v == "(devel)" {
			v = info.Main.Version
		}
	}
	if v == "" || v == "(devel)" {
		return "dev"
	}
	return v
}

// hostEnv is this process's environment without GOFLAGS, so the helper is
// built for this machine and without -race.
func hostEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "GOFLAGS=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}
