package build

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
)

func root(t *testing.T) string {
	t.Helper()
	r, err := FindRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestFindRoot(t *testing.T) {
	r := root(t)
	if _, err := os.Stat(filepath.Join(r, "models", "bundle", "bundle.go")); err != nil {
		t.Fatalf("root %s does not look like the repository: %v", r, err)
	}
	if _, err := FindRoot(t.TempDir()); err == nil || !strings.Contains(err.Error(), ModulePath) {
		t.Fatalf("FindRoot outside the repository: %v", err)
	}
}

func TestExamples(t *testing.T) {
	exs, err := Examples(root(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, ex := range exs {
		if ex.Name == "grid-anomaly" {
			if strings.Join(ex.Versions, ",") != "1.0.0,1.1.0" {
				t.Fatalf("grid-anomaly versions %v", ex.Versions)
			}
			return
		}
	}
	t.Fatalf("grid-anomaly not among %+v", exs)
}

func TestExampleBundleAndCache(t *testing.T) {
	ctx := context.Background()
	b := &Builder{Root: root(t), CacheDir: t.TempDir()}
	bd, err := b.Example(ctx, "grid-anomaly", "1.1.0")
	if err != nil {
		t.Fatal(err)
	}
	m := bd.Manifest
	if m.ABI != ABIVersion || m.Name != "grid-anomaly" || m.Version != "1.1.0" || len(m.Tests) < 2 || len(m.Inputs) != 1 || m.Limits.MemoryPages == 0 {
		t.Fatalf("manifest %+v", m)
	}
	if !bytes.HasPrefix(bd.Module, []byte("\x00asm")) {
		t.Fatal("module is not WebAssembly")
	}
	// The version is compiled in: 1.0.0's module differs.
	other, err := b.Example(ctx, "grid-anomaly", "1.0.0")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(other.Module, bd.Module) {
		t.Fatal("1.0.0 and 1.1.0 built to the same module")
	}
	// The second build is served from the cache: poison the cached file and
	// see it come back.
	files, _ := filepath.Glob(filepath.Join(b.CacheDir, "grid-anomaly-1.1.0-*.wasm"))
	if len(files) != 1 {
		t.Fatalf("cache holds %v", files)
	}
	if err := os.WriteFile(files[0], []byte("cached"), 0o644); err != nil {
		t.Fatal(err)
	}
	mod, err := b.Module(ctx, filepath.Join(ExamplesDir, "grid-anomaly"), "1.1.0")
	if err != nil || string(mod) != "cached" {
		t.Fatalf("second build did not come from the cache: %q %v", mod[:min(8, len(mod))], err)
	}
	// Without a cache the build is reproducible.
	fresh, err := (&Builder{Root: b.Root}).Module(ctx, filepath.Join(ExamplesDir, "grid-anomaly"), "1.1.0")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fresh, bd.Module) {
		t.Fatal("two builds of the same source differ")
	}
	if _, err := bundle.Decode(mustEncode(t, bd)); err != nil {
		t.Fatal(err)
	}
}

func mustEncode(t *testing.T, b *bundle.Bundle) []byte {
	t.Helper()
	data, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestExampleErrors(t *testing.T) {
	ctx := context.Background()
	b := &Builder{Root: root(t)}
	if _, err := b.Example(ctx, "grid-anomaly", "9.9.9"); err == nil || !strings.Contains(err.Error(), "golden-9.9.9.json") {
		t.Fatalf("unknown version: %v", err)
	}
	if _, err := b.Example(ctx, "no-such-model", "1.0.0"); err == nil {
		t.Fatal("unknown example built")
	}
	// A guest that does not compile reports the compiler's message.
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module broken\n\ngo 1.24\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "main.go"), []byte("package main\n\nfunc main() { undefined() }\n"), 0o644)
	if _, err := (&Builder{Root: dir}).Module(ctx, dir, "1.0.0"); err == nil || !strings.Contains(err.Error(), "undefined") {
		t.Fatalf("broken guest: %v", err)
	}
}
