// Package build compiles Go guest models to WebAssembly and packs the
// examples under models/examples into bundles. scripts/buildmodels and
// models/modeltest share it, so the bundles a developer builds by hand are
// the ones tests run.
//
// An example is a directory models/examples/<name> holding a Go package
// main that registers the model with models/sdk, plus:
//
//	model.json             manifest fields: name, description, inputs, outputs, limits
//	golden-<version>.json  {"tests": [...]}: the golden vectors of that version,
//	                       computed natively (never by running the module)
//
// Every version with a golden file is a version of the example; the version
// reaches the module through -ldflags "-X main.version=<version>".
package build

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"

	"github.com/edgefleet/edgefleet/models/bundle"
)

// ModulePath is the Go module whose repository holds the examples.
const ModulePath = "github.com/edgefleet/edgefleet"

// ExamplesDir is where examples live, relative to the repository root.
const ExamplesDir = "models/examples"

// ABIVersion is the Model ABI the Go SDK speaks, written into manifests.
const ABIVersion = 1

// FindRoot walks up from dir to the directory whose go.mod declares
// ModulePath.
func FindRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		data, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && modulePathRE.Match(data) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod of module %s in %s or above; run from inside the edgefleet repository", ModulePath, dir)
		}
	}
}

var modulePathRE = regexp.MustCompile(`(?m)^module\s+` + regexp.QuoteMeta(ModulePath) + `\s*$`)

// Builder compiles guests of the repository at Root.
type Builder struct {
	// Root is the repository root (see FindRoot).
	Root string
	// CacheDir, if set, keeps built modules keyed by a hash of every source
	// file that goes into them, the version and the Go version, so
	// rebuilding unchanged sources is a file read. Writers use a temporary
	// file and a rename, so concurrent builders are safe.
	CacheDir string
}

// Module compiles the Go guest package in pkgDir (absolute, or relative to
// Root) for GOOS=wasip1 as a reactor (-buildmode=c-shared) with
// main.version set to version, and returns the .wasm bytes. Builds are
// reproducible (-trimpath, no VCS stamp).
func (b *Builder) Module(ctx context.Context, pkgDir, version string) ([]byte, error) {
	if !filepath.IsAbs(pkgDir) {
		pkgDir = filepath.Join(b.Root, pkgDir)
	}
	var cachePath string
	if b.CacheDir != "" {
		key, err := b.sourceKey(ctx, pkgDir, version)
		if err != nil {
			return nil, err
		}
		cachePath = filepath.Join(b.CacheDir, fmt.Sprintf("%s-%s-%s.wasm", filepath.Base(pkgDir), version, key[:24]))
		if data, err := os.ReadFile(cachePath); err == nil {
			return data, nil
		}
	}
	tmp, err := os.MkdirTemp("", "edgefleet-build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "model.wasm")
	cmd := exec.CommandContext(ctx, "go", "build", "-buildmode=c-shared", "-trimpath", "-buildvcs=false",
		"-ldflags", "-X main.version="+version, "-o", out, ".")
	cmd.Dir = pkgDir
	cmd.Env = wasmEnv()
	if msg, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build %s for wasip1: %w\n%s", pkgDir, err, msg)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return nil, err
	}
	if cachePath != "" {
		if err := writeAtomic(cachePath, data); err != nil {
			return nil, fmt.Errorf("cache built module: %w", err)
		}
	}
	return data, nil
}

// wasmEnv is the environment of a guest build: this process's, retargeted.
// GOFLAGS is dropped because flags meant for the host build (-race, -cover)
// do not apply to wasip1.
func wasmEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "GOOS", "GOARCH", "GOFLAGS", "CGO_ENABLED", "GOWASM":
			continue
		}
		env = append(env, kv)
	}
	return append(env, "GOOS=wasip1", "GOARCH=wasm", "CGO_ENABLED=0")
}

// sourceKey hashes everything a build depends on: the Go version, go.mod
// and go.sum (which pin outside dependencies), every Go and embedded file
// of the packages of this module that pkgDir imports, and the version.
func (b *Builder) sourceKey(ctx context.Context, pkgDir, version string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-deps",
		"-f", `{{if .Module}}{{if eq .Module.Path "`+ModulePath+`"}}{{.Dir}}{{"\t"}}{{join .GoFiles "\t"}}{{"\t"}}{{join .EmbedFiles "\t"}}{{end}}{{end}}`, ".")
	cmd.Dir = pkgDir
	cmd.Env = wasmEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	list, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("list sources of %s: %w\n%s", pkgDir, err, stderr.Bytes())
	}
	h := sha256.New()
	fmt.Fprintf(h, "edgefleet-guest-v1\x00%s\x00%s\x00", goVersion(ctx), version)
	for _, f := range []string{"go.mod", "go.sum"} {
		if err := hashFile(h, filepath.Join(b.Root, f), f); err != nil {
			return "", err
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(string(list)), "\n") {
		fields := strings.Split(line, "\t")
		if len(fields) < 2 {
			continue
		}
		dir := fields[0]
		rel, _ := filepath.Rel(b.Root, dir)
		for _, f := range fields[1:] {
			if f == "" {
				continue
			}
			if err := hashFile(h, filepath.Join(dir, f), filepath.ToSlash(filepath.Join(rel, f))); err != nil {
				return "", err
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func hashFile(h interface{ Write([]byte) (int, error) }, path, name string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	fmt.Fprintf(h, "%s\x00%x\x00", name, sum)
	return nil
}

var (
	goVersionOnce sync.Once
	goVersionStr  string
)

func goVersion(ctx context.Context) string {
	goVersionOnce.Do(func() {
		out, err := exec.CommandContext(ctx, "go", "env", "GOVERSION").Output()
		if err == nil {
			goVersionStr = strings.TrimSpace(string(out))
		}
	})
	return goVersionStr
}

func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.part")
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return err
	}
	return nil
}

// Example is one example model under models/examples.
type Example struct {
	Name string
	// Dir is the example's directory.
	Dir string
	// Versions are those with a golden-<version>.json file, sorted.
	Versions []string
}

var goldenRE = regexp.MustCompile(`^golden-(.+)\.json$`)

// Examples lists the examples under root/models/examples: every directory
// with a model.json.
func Examples(root string) ([]Example, error) {
	base := filepath.Join(root, ExamplesDir)
	entries, err := os.ReadDir(base)
	if err != nil {
		return nil, fmt.Errorf("list examples: %w", err)
	}
	var out []Example
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(base, e.Name())
		if _, err := os.Stat(filepath.Join(dir, "model.json")); err != nil {
			continue
		}
		ex := Example{Name: e.Name(), Dir: dir}
		files, err := os.ReadDir(dir)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			if m := goldenRE.FindStringSubmatch(f.Name()); m != nil {
				ex.Versions = append(ex.Versions, m[1])
			}
		}
		sort.Strings(ex.Versions)
		out = append(out, ex)
	}
	return out, nil
}

// ModelInfo is the part of a manifest an example declares in model.json.
type ModelInfo struct {
	Name        string              `json:"name"`
	Description string              `json:"description,omitempty"`
	Inputs      []bundle.TensorSpec `json:"inputs"`
	Outputs     []bundle.TensorSpec `json:"outputs"`
	Limits      bundle.Limits       `json:"limits,omitempty"`
}

// Golden is the content of a golden-<version>.json file: the golden
// vectors of that version and, optionally, its drift reference (the output
// histograms depend on the version).
type Golden struct {
	Tests     []bundle.TestVector `json:"tests"`
	Reference *bundle.Reference   `json:"reference,omitempty"`
}

// ReadModelInfo reads an example's model.json strictly.
func ReadModelInfo(dir string) (ModelInfo, error) {
	var mi ModelInfo
	err := readJSON(filepath.Join(dir, "model.json"), &mi)
	return mi, err
}

// ReadGolden reads an example's golden-<version>.json strictly.
func ReadGolden(dir, version string) (Golden, error) {
	var g Golden
	err := readJSON(filepath.Join(dir, "golden-"+version+".json"), &g)
	return g, err
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// Example builds example name at version into a bundle: the module from
// source, the manifest from model.json and golden-<version>.json.
func (b *Builder) Example(ctx context.Context, name, version string) (*bundle.Bundle, error) {
	dir := filepath.Join(b.Root, ExamplesDir, name)
	mi, err := ReadModelInfo(dir)
	if err != nil {
		return nil, fmt.Errorf("example %s: %w", name, err)
	}
	if mi.Name != name {
		return nil, fmt.Errorf("example %s: model.json names it %q; the directory and the name must agree", name, mi.Name)
	}
	g, err := ReadGolden(dir, version)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("example %s has no version %s: write golden-%s.json beside it first", name, version, version)
	}
	if err != nil {
		return nil, fmt.Errorf("example %s: %w", name, err)
	}
	if len(g.Tests) == 0 {
		return nil, fmt.Errorf("example %s %s: golden-%s.json holds no tests", name, version, version)
	}
	module, err := b.Module(ctx, dir, version)
	if err != nil {
		return nil, err
	}
	man := bundle.Manifest{
		ABI:         ABIVersion,
		Name:        mi.Name,
		Version:     version,
		Description: mi.Description,
		Inputs:      mi.Inputs,
		Outputs:     mi.Outputs,
		Limits:      mi.Limits,
		Tests:       g.Tests,
		Reference:   g.Reference,
	}
	bd, err := bundle.New(man, module)
	if err != nil {
		return nil, fmt.Errorf("example %s %s: %w", name, version, err)
	}
	return bd, nil
}
