package modeltest

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
)

func TestBuildExampleRuns(t *testing.T) {
	data := BuildExample(t, "grid-anomaly", "1.0.0")
	b, err := bundle.Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	if b.Manifest.Version != "1.0.0" || len(b.Manifest.Tests) == 0 {
		t.Fatalf("manifest %+v", b.Manifest)
	}
	// The bundle runs in a real host, golden tests included.
	h := NewHost(t, host.Options{})
	m, err := h.Load(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	out, err := m.Infer(context.Background(), []tensor.Tensor{tensor.FromFloat32("readings", []int64{1, 4}, []float32{230, 10, 50, 25})})
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := out[0].Float32s(); len(s) != 1 || s[0] > 0.05 {
		t.Fatalf("nominal readings scored %v", s)
	}
	// Built modules are cached.
	if files, _ := filepath.Glob(filepath.Join(CacheDir(), "grid-anomaly-1.0.0-*.wasm")); len(files) == 0 {
		t.Fatalf("nothing cached in %s", CacheDir())
	}
}

func TestCacheDirOverride(t *testing.T) {
	t.Setenv(CacheEnv, "/somewhere/else")
	if CacheDir() != "/somewhere/else" || CompilationCacheDir() != filepath.Join("/somewhere/else", "wazero") {
		t.Fatalf("CacheDir %s, CompilationCacheDir %s", CacheDir(), CompilationCacheDir())
	}
}

func TestBundleFillsABI(t *testing.T) {
	b := Bundle(t, bundle.Manifest{
		Name: "x", Version: "0.1.0",
		Inputs:  []bundle.TensorSpec{{Name: "a", Datatype: "FP32", Shape: []int64{1}}},
		Outputs: []bundle.TensorSpec{{Name: "b", Datatype: "FP32", Shape: []int64{1}}},
	}, []byte("\x00asm\x01\x00\x00\x00"))
	if b.Manifest.ABI != 1 || b.Digest == "" {
		t.Fatalf("%+v", b.Manifest)
	}
}

func TestWazeroVersion(t *testing.T) {
	// Test binaries carry no dependency versions, so this is "dev"; what
	// matters is that it is what wazero itself computes, which the
	// race-mode host tests check by finding precompiled code.
	if v := wazeroVersion(); v == "" {
		t.Fatal("empty wazero version")
	}
}
