package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
)

// compiledBundles names the bundles of the compiled examples.
func compiledBundles(t *testing.T) []string {
	t.Helper()
	wd, _ := os.Getwd()
	root, err := build.FindRoot(wd)
	if err != nil {
		t.Fatal(err)
	}
	dirs, err := compiler.FindSpecs(filepath.Join(root, build.ExamplesDir))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range dirs {
		s, err := compiler.ReadSpec(d)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, s.Name+"-"+s.Version+".bundle")
	}
	return names
}

func TestBuildCompiled(t *testing.T) {
	names := compiledBundles(t)
	for _, sector := range []string{"breast-cancer-risk", "meter-digits", "fraud-score", "maintenance-risk", "store-demand"} {
		if !strings.Contains(strings.Join(names, " "), sector+"-1.0.0.bundle") {
			t.Errorf("no compiled example %s", sector)
		}
	}
	wd, _ := os.Getwd()
	root, _ := build.FindRoot(wd)
	out := t.TempDir()
	var stdout bytes.Buffer
	if err := buildCompiled(context.Background(), root, out, &stdout); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		b, err := bundle.ReadFile(filepath.Join(out, n))
		if err != nil {
			t.Fatal(err)
		}
		if len(b.Manifest.Tests) == 0 || !strings.Contains(stdout.String(), b.Digest) {
			t.Errorf("%s: %d tests; digest printed: %v", n, len(b.Manifest.Tests), strings.Contains(stdout.String(), b.Digest))
		}
		if b.Manifest.Reference == nil {
			t.Errorf("%s: no drift reference in the manifest", n)
		}
	}
}
