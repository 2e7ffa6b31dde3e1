// Package testmodels lists and builds Edgefleet's misbehaving test models:
// WebAssembly modules built from source in the directories below this
// one, each laid out like an example (model.json, golden-<version>.json,
// a Go guest package), so `make models` builds them like the examples and
// tests get them through models/modeltest.
//
// Today there is one: grid-anomaly's test variants (grid-anomaly/), which
// share grid-anomaly's name, tensors and 1.0.0 scores and differ in one
// behaviour each, picked by the version's suffix:
//
//	1.2.0-slow      each call takes about 3x as long (small batches; up to 5x)
//	1.3.0-flaky     fails about 30% of requests, chosen by a hash of the input
//	1.4.0-loop      loops forever on a request holding TriggerRow
//	1.5.0-membomb   allocates without bound on a request holding TriggerRow
//	1.6.0-trap      traps (out-of-bounds load) on a request holding TriggerRow
//	1.7.0-wrong     answers 1 - score: fails its golden vectors
//
// The loop, membomb and trap variants pass their golden tests (which hold
// no trigger row), as a model with a bug in a rarely taken branch would;
// the wrong one never passes them.
package testmodels

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"sort"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/bundle"
)

// Dir is where the test models live, relative to the repository root.
const Dir = "models/examples/testmodels"

// Versions of the grid-anomaly test variants.
const (
	Slow    = "1.2.0-slow"
	Flaky   = "1.3.0-flaky"
	Loop    = "1.4.0-loop"
	MemBomb = "1.5.0-membomb"
	Trap    = "1.6.0-trap"
	Wrong   = "1.7.0-wrong"
)

// TriggerRow is a grid-anomaly reading (volts, amps, hertz, degrees C)
// that makes the loop, membomb and trap variants misbehave: its
// temperature is a sensor-fault value (-1000) no golden vector holds.
var TriggerRow = [4]float32{230, 10, 50, -1000}

// FlakyPercent is the share of requests the flaky variant fails.
const FlakyPercent = 30

// FlakyFails reports whether the flaky variant fails a request whose
// readings tensor holds these bytes (FP32, little-endian, row-major): it
// does when their FNV-1a hash falls in the lowest FlakyPercent of 100
// buckets. It mirrors the guest, so tests can tell which requests must
// fail; models/host's tests check the two agree.
func FlakyFails(readings []byte) bool {
	h := fnv.New32a()
	h.Write(readings)
	return h.Sum32()%100 < FlakyPercent
}

// List returns the test models under root (every directory below Dir with
// a model.json), with the versions their golden files name.
func List(root string) ([]build.Example, error) {
	base := filepath.Join(root, Dir)
	entries, err := os.ReadDir(base)
	if err != nil {
		return nil, fmt.Errorf("list test models: %w", err)
	}
	var out []build.Example
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(base, e.Name())
		if _, err := os.Stat(filepath.Join(dir, "model.json")); err != nil {
			continue
		}
		ex := build.Example{Name: e.Name(), Dir: dir}
		files, err := filepath.Glob(filepath.Join(dir, "golden-*.json"))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			name := filepath.Base(f)
			ex.Versions = append(ex.Versions, name[len("golden-"):len(name)-len(".json")])
		}
		sort.Strings(ex.Versions)
		out = append(out, ex)
	}
	return out, nil
}

// Has reports whether root holds test model name at version.
func Has(root, name, version string) bool {
	_, err := os.Stat(filepath.Join(root, Dir, name, "golden-"+version+".json"))
	return err == nil
}

// Build builds test model name at version into a bundle, as
// build.Builder.Example does for an example: the module from source, the
// manifest from model.json and golden-<version>.json.
func Build(ctx context.Context, b *build.Builder, name, version string) (*bundle.Bundle, error) {
	dir := filepath.Join(b.Root, Dir, name)
	mi, err := build.ReadModelInfo(dir)
	if err != nil {
		return nil, fmt.Errorf("test model %s: %w", name, err)
	}
	if mi.Name != name {
		return nil, fmt.Errorf("test model %s: model.json names it %q; the directory and the name must agree", name, mi.Name)
	}
	g, err := build.ReadGolden(dir, version)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("test model %s has no version %s: write golden-%s.json beside it first", name, version, version)
	}
	if err != nil {
		return nil, fmt.Errorf("test model %s: %w", name, err)
	}
	module, err := b.Module(ctx, dir, version)
	if err != nil {
		return nil, err
	}
	bd, err := bundle.New(bundle.Manifest{
		ABI:         build.ABIVersion,
		Name:        mi.Name,
		Version:     version,
		Description: mi.Description,
		Inputs:      mi.Inputs,
		Outputs:     mi.Outputs,
		Limits:      mi.Limits,
		Tests:       g.Tests,
	}, module)
	if err != nil {
		return nil, fmt.Errorf("test model %s %s: %w", name, version, err)
	}
	return bd, nil
}
