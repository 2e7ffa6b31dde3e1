package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
)

func TestBuildModels(t *testing.T) {
	if testing.Short() {
		t.Skip("builds every example for wasip1")
	}
	out := t.TempDir()
	var stdout, stderr bytes.Buffer
	if code := doMain(context.Background(), []string{"-out", out}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	want := map[string]bool{"grid-anomaly-1.0.0.bundle": false, "grid-anomaly-1.1.0.bundle": false}
	for _, name := range compiledBundles(t) {
		want[name] = false
	}
	for _, line := range lines {
		path, digest, ok := strings.Cut(line, "\tsha256:")
		if !ok {
			t.Fatalf("line %q is not PATH<tab>sha256:DIGEST", line)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		if hex.EncodeToString(sum[:]) != digest {
			t.Fatalf("%s: printed digest %s is not the file's", path, digest)
		}
		b, err := bundle.Decode(data)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		base := filepath.Base(path)
		if filepath.Dir(path) == filepath.Join(out, TestModelsDir) {
			continue // testmodels_test.go checks those
		}
		if _, ok := want[base]; !ok {
			t.Fatalf("unexpected bundle %s", base)
		}
		want[base] = true
		if name := b.Manifest.Name + "-" + b.Manifest.Version + ".bundle"; name != base || len(b.Manifest.Tests) == 0 {
			t.Fatalf("%s holds %s with %d tests", base, name, len(b.Manifest.Tests))
		}
		// Every example carries a drift reference, so rollouts of it can
		// gate on drift.
		if r := b.Manifest.Reference; r == nil || r.Rows == 0 || len(r.Features) == 0 || len(r.Outputs) == 0 {
			t.Fatalf("%s: no drift reference in the manifest: %+v", base, r)
		}
	}
	for name, seen := range want {
		if !seen {
			t.Errorf("%s not built", name)
		}
	}
}

func TestUsage(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := doMain(context.Background(), nil, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "usage") {
		t.Fatalf("no -out: exit %d, %q", code, stderr.String())
	}
	if code := doMain(context.Background(), []string{"-out", t.TempDir(), "-root", t.TempDir()}, &stdout, &stderr); code != 1 {
		t.Fatalf("root without examples: exit %d", code)
	}
}
