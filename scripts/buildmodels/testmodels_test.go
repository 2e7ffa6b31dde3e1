package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/examples/testmodels"
)

func TestBuildTestModels(t *testing.T) {
	if testing.Short() {
		t.Skip("builds every test model for wasip1")
	}
	root, err := build.FindRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	var stdout bytes.Buffer
	if err := buildTestModels(context.Background(), &build.Builder{Root: root}, out, &stdout); err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, v := range []string{testmodels.Slow, testmodels.Flaky, testmodels.Loop, testmodels.MemBomb, testmodels.Trap, testmodels.Wrong} {
		want["grid-anomaly-"+v+".bundle"] = false
	}
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		path, digest, ok := strings.Cut(line, "\tsha256:")
		if !ok || filepath.Dir(path) != filepath.Join(out, TestModelsDir) {
			t.Fatalf("line %q is not %s/testmodels/BUNDLE<tab>sha256:DIGEST", line, out)
		}
		b, err := bundle.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if b.Digest != digest || b.Manifest.Name != "grid-anomaly" || len(b.Manifest.Tests) == 0 {
			t.Fatalf("%s: digest %s (printed %s), manifest %s with %d tests", path, b.Digest, digest, b.Manifest.Name, len(b.Manifest.Tests))
		}
		base := filepath.Base(path)
		if _, ok := want[base]; !ok || base != "grid-anomaly-"+b.Manifest.Version+".bundle" {
			t.Fatalf("unexpected bundle %s holding version %s", base, b.Manifest.Version)
		}
		want[base] = true
	}
	for name, seen := range want {
		if !seen {
			t.Errorf("%s not built", name)
		}
	}
}
