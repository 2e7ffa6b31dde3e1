package compiler

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/edgefleet/edgefleet/models/bundle"
)

// SpecFile names the file that makes a directory a compiled example (under
// models/examples) or a compiler fixture (models/compiler/testdata).
const SpecFile = "compile.json"

// Spec is a compile.json: how to build a bundle from a model file and the
// CSV files beside it. Paths are relative to the file's directory.
// scripts/fixtures/make_fixtures.py writes them.
type Spec struct {
	Name        string `json:"name"`
	Version     string `json:"version"`
	From        Format `json:"from"`
	Model       string `json:"model"`
	Description string `json:"description,omitempty"`
	// Dataset says where the training data came from, plainly when it is
	// synthetic.
	Dataset string `json:"dataset,omitempty"`
	// Library is what trained the model and computed TestOutputs.
	Library     string        `json:"library,omitempty"`
	Labels      []string      `json:"labels,omitempty"`
	Reference   string        `json:"reference,omitempty"`
	TestInputs  string        `json:"testInputs,omitempty"`
	TestOutputs string        `json:"testOutputs,omitempty"`
	Tests       int           `json:"tests,omitempty"`
	Limits      bundle.Limits `json:"limits,omitempty"`
	// Checks are further predictions of TestInputs to compare with, such
	// as scikit-learn's own for a model exported to ONNX. Tests use them;
	// builds do not.
	Checks []Check `json:"checks,omitempty"`

	// Dir is the directory the spec was read from.
	Dir string `json:"-"`
}

// Check is one more set of reference predictions for a spec's test inputs.
type Check struct {
	Outputs string `json:"outputs"`
	Library string `json:"library"`
}

// ReadSpec reads dir/compile.json strictly.
func ReadSpec(dir string) (*Spec, error) {
	path := filepath.Join(dir, SpecFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s Spec
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if _, err := ParseFormat(string(s.From)); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if s.Model == "" {
		return nil, fmt.Errorf("%s: \"model\" names no model file", path)
	}
	s.Dir = dir
	return &s, nil
}

// Path resolves a file named in the spec.
func (s *Spec) Path(name string) string { return filepath.Join(s.Dir, name) }

// Load reads the spec's model file.
func (s *Spec) Load() (*Model, error) { return LoadFile(s.From, s.Path(s.Model)) }

// Options reads the spec's tables into compile options.
func (s *Spec) Options() (Options, error) {
	o := Options{Name: s.Name, Version: s.Version, Description: s.Description, Labels: s.Labels, MaxTests: s.Tests, Limits: s.Limits}
	var err error
	read := func(name string) *Table {
		if name == "" || err != nil {
			return nil
		}
		var t *Table
		t, err = ReadTableFile(s.Path(name))
		return t
	}
	o.Reference = read(s.Reference)
	o.TestInputs = read(s.TestInputs)
	o.TestOutputs = read(s.TestOutputs)
	return o, err
}

// Build compiles the spec into a bundle.
func (s *Spec) Build() (*Result, error) {
	m, err := s.Load()
	if err != nil {
		return nil, err
	}
	o, err := s.Options()
	if err != nil {
		return nil, err
	}
	r, err := Compile(m, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Dir, err)
	}
	return r, nil
}

// FindSpecs returns the directories directly under dir holding a
// compile.json, sorted.
func FindSpecs(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		d := filepath.Join(dir, e.Name())
		if _, err := os.Stat(filepath.Join(d, SpecFile)); err == nil {
			out = append(out, d)
		}
	}
	return out, nil
}
