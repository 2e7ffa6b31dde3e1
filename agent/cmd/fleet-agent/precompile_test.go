package main

import (
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/models/compiler"
)

// TestPrecompileSubcommand: `fleet-agent precompile` compiles a stored
// bundle into the data directory's compilation cache, and refuses
// malformed digests, missing and damaged bundles without touching
// anything outside the bundle store.
func TestPrecompileSubcommand(t *testing.T) {
	spec, err := compiler.ReadSpec("../../../models/examples/breast-cancer-risk")
	if err != nil {
		t.Fatal(err)
	}
	res, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := res.Bundle.Encode()
	if err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	sum := sha256.Sum256(raw)
	digest := hex.EncodeToString(sum[:])
	store := filepath.Join(data, deploy.BundlesDir)
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, digest+".bundle"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	damaged := strings.Repeat("ab", 32)
	if err := os.WriteFile(filepath.Join(store, damaged+".bundle"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no digest", []string{"--data", data}, 2, "usage"},
		{"no data", []string{digest}, 2, "usage"},
		{"path in digest", []string{"--data", data, "../../etc/passwd"}, 1, "64 lowercase hex"},
		{"missing bundle", []string{"--data", data, strings.Repeat("0", 64)}, 1, "no such file"},
		{"damaged bundle", []string{"--data", data, damaged}, 1, "does not match its digest"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var stderr syncBuffer
			if code := doMain(t.Context(), append([]string{"precompile"}, c.args...), noEnv, &stderr); code != c.code || !strings.Contains(stderr.String(), c.want) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, stderr.String(), c.code, c.want)
			}
		})
	}
	if n := compiled(t, data); n != 0 {
		t.Fatalf("%d compiled modules after refusals only", n)
	}
	var stderr syncBuffer
	if code := doMain(t.Context(), []string{"precompile", "--data", data, digest}, noEnv, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if n := compiled(t, data); n != 1 {
		t.Fatalf("%d compiled modules in the cache, want 1", n)
	}
}

// compiled counts the compiled modules in DATA's compilation cache.
func compiled(t *testing.T, data string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(filepath.Join(data, agent.CacheDir), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if d.Type().IsRegular() && !strings.HasSuffix(path, ".tmp") {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}
