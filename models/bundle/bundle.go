// Package bundle reads and writes model bundles: one file holding a
// manifest, the WASM module it pins by SHA-256, and an optional signature
// over the manifest.
//
// On disk a bundle is a POSIX tar archive (so `tar tf` can inspect it) with
// exactly these members, in this order:
//
//	manifest.json   the Manifest, JSON
//	model.wasm      the module; its SHA-256 and size are in the manifest
//	manifest.sig    optional: signature over manifest.json's exact bytes
//
// A bundle is addressed by the SHA-256 of the whole file (its digest). The
// manifest pins the module, so a signature over the manifest covers the
// module too.
package bundle

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"time"

	"github.com/edgefleet/edgefleet/models/tensor"
)

// Member names inside the bundle archive.
const (
	ManifestName  = "manifest.json"
	ModuleName    = "model.wasm"
	SignatureName = "manifest.sig"
)

// Size caps, checked before anything is decoded.
const (
	MaxBundleSize    = 64 << 20 // whole file
	MaxManifestSize  = 1 << 20
	MaxSignatureSize = 16 << 10
)

// ErrInvalid is wrapped by every error about a malformed bundle.
var ErrInvalid = errors.New("invalid bundle")

// Manifest describes a model. Its JSON form is the bundle's manifest.json.
type Manifest struct {
	// ABI is the model ABI version the module speaks (models/ABI.md).
	ABI         int    `json:"abi"`
	Name        string `json:"name"`
	Version     string `json:"version"`
	Description string `json:"description,omitempty"`
	// Module pins the WASM module.
	Module  ModuleRef    `json:"module"`
	Inputs  []TensorSpec `json:"inputs"`
	Outputs []TensorSpec `json:"outputs"`
	Limits  Limits       `json:"limits,omitempty"`
	// Tests are golden vectors the module must reproduce before activation.
	Tests []TestVector `json:"tests,omitempty"`
	// Labels names the classes of a classifier, index = class id: one per
	// column of the first output, or two (negative, positive) for a
	// single probability.
	Labels []string `json:"labels,omitempty"`
	// Reference holds the drift reference histograms (reference.go).
	Reference *Reference `json:"reference,omitempty"`
}

// ModuleRef pins the module by digest and size.
type ModuleRef struct {
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// TensorSpec names one input or output tensor. Datatype uses the Open
// Inference Protocol names (FP32, INT64, ...). A -1 in Shape is a free
// dimension (usually the batch).
type TensorSpec struct {
	Name     string  `json:"name"`
	Datatype string  `json:"datatype"`
	Shape    []int64 `json:"shape"`
}

// Limits bound the module at run time. Zero means the host's default.
type Limits struct {
	// MemoryPages caps linear memory in 64 KiB pages.
	MemoryPages uint32 `json:"memoryPages,omitempty"`
	// TimeoutMillis is the deadline of one inference call.
	TimeoutMillis int `json:"timeoutMillis,omitempty"`
}

// Timeout returns the inference deadline, or def when none is set.
func (l Limits) Timeout(def time.Duration) time.Duration {
	if l.TimeoutMillis <= 0 {
		return def
	}
	return time.Duration(l.TimeoutMillis) * time.Millisecond
}

// TestVector is one golden input and its expected output.
type TestVector struct {
	Inputs    []TensorValue `json:"inputs"`
	Outputs   []TensorValue `json:"outputs"`
	Tolerance float64       `json:"tolerance,omitempty"`
}

// TensorValue is a tensor in JSON, in the Open Inference Protocol's shape:
// data is flat, row-major.
type TensorValue struct {
	Name     string    `json:"name"`
	Datatype string    `json:"datatype"`
	Shape    []int64   `json:"shape"`
	Data     []float64 `json:"data"`
}

var (
	nameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	versionRE = regexp.MustCompile(`^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$`)
	hexRE     = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// Validate checks the manifest's own fields.
func (m *Manifest) Validate() error {
	if m.ABI <= 0 {
		return fmt.Errorf("%w: manifest abi is %d; set it to the ABI version the module speaks (1)", ErrInvalid, m.ABI)
	}
	if !nameRE.MatchString(m.Name) {
		return fmt.Errorf("%w: manifest name %q: use 1-63 lowercase letters, digits, '.', '_' or '-'", ErrInvalid, m.Name)
	}
	if !versionRE.MatchString(m.Version) {
		return fmt.Errorf("%w: manifest version %q is not a semantic version such as 1.2.0", ErrInvalid, m.Version)
	}
	if !hexRE.MatchString(m.Module.SHA256) {
		return fmt.Errorf("%w: manifest module.sha256 %q is not 64 lowercase hex digits", ErrInvalid, m.Module.SHA256)
	}
	if m.Module.Size <= 0 {
		return fmt.Errorf("%w: manifest module.size is %d", ErrInvalid, m.Module.Size)
	}
	if len(m.Inputs) == 0 || len(m.Outputs) == 0 {
		return fmt.Errorf("%w: manifest must list at least one input and one output tensor", ErrInvalid)
	}
	for _, list := range [][]TensorSpec{m.Inputs, m.Outputs} {
		seen := map[string]bool{}
		for _, s := range list {
			if s.Name == "" || s.Datatype == "" {
				return fmt.Errorf("%w: manifest tensor %+v needs a name and a datatype", ErrInvalid, s)
			}
			if _, err := tensor.ParseDType(s.Datatype); err != nil {
				return fmt.Errorf("%w: manifest tensor %q: %v", ErrInvalid, s.Name, err)
			}
			for _, d := range s.Shape {
				if d < -1 {
					return fmt.Errorf("%w: manifest tensor %q has dimension %d; use -1 for a free dimension", ErrInvalid, s.Name, d)
				}
			}
			if seen[s.Name] {
				return fmt.Errorf("%w: manifest lists tensor %q twice", ErrInvalid, s.Name)
			}
			seen[s.Name] = true
		}
	}
	if err := m.validateLabels(); err != nil {
		return err
	}
	return m.validateReference()
}

// Bundle is a decoded bundle.
type Bundle struct {
	Manifest Manifest
	// ManifestJSON is manifest.json exactly as stored; signatures cover it.
	ManifestJSON []byte
	Module       []byte
	Signature    []byte
	// Digest is the SHA-256 of the bundle file, lowercase hex.
	Digest string
}

// New builds a bundle from a manifest and a module, filling in the module's
// digest and size.
func New(m Manifest, module []byte) (*Bundle, error) {
	sum := sha256.Sum256(module)
	m.Module = ModuleRef{SHA256: hex.EncodeToString(sum[:]), Size: int64(len(module))}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	mj, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	b := &Bundle{Manifest: m, ManifestJSON: mj, Module: module}
	enc, err := b.Encode()
	if err != nil {
		return nil, err
	}
	b.Digest = digest(enc)
	return b, nil
}

// Encode returns the bundle file's bytes.
func (b *Bundle) Encode() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, data []byte) error {
		// Fixed header fields, so the same bundle always encodes to the same bytes.
		h := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Format: tar.FormatUSTAR, ModTime: time.Unix(0, 0)}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add(ManifestName, b.ManifestJSON); err != nil {
		return nil, err
	}
	if err := add(ModuleName, b.Module); err != nil {
		return nil, err
	}
	if len(b.Signature) > 0 {
		if err := add(SignatureName, b.Signature); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Decode parses a bundle file. It checks the size cap, the member names and
// order, the manifest, and the module's digest against the manifest. It does
// not check the signature (that needs the trusted keys).
func Decode(data []byte) (*Bundle, error) {
	if len(data) > MaxBundleSize {
		return nil, fmt.Errorf("%w: %d bytes, over the %d byte limit", ErrInvalid, len(data), MaxBundleSize)
	}
	b := &Bundle{Digest: digest(data)}
	tr := tar.NewReader(bytes.NewReader(data))
	for i := 0; ; i++ {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: not a bundle archive: %v", ErrInvalid, err)
		}
		var limit int64
		var dst *[]byte
		switch {
		case i == 0 && h.Name == ManifestName:
			limit, dst = MaxManifestSize, &b.ManifestJSON
		case i == 1 && h.Name == ModuleName:
			limit, dst = MaxBundleSize, &b.Module
		case i == 2 && h.Name == SignatureName:
			limit, dst = MaxSignatureSize, &b.Signature
		default:
			return nil, fmt.Errorf("%w: member %d is %q; want %s, %s, then optionally %s", ErrInvalid, i, h.Name, ManifestName, ModuleName, SignatureName)
		}
		if h.Typeflag != tar.TypeReg || h.Size > limit {
			return nil, fmt.Errorf("%w: member %q: not a regular file of at most %d bytes", ErrInvalid, h.Name, limit)
		}
		if *dst, err = io.ReadAll(io.LimitReader(tr, limit)); err != nil {
			return nil, fmt.Errorf("%w: member %q: %v", ErrInvalid, h.Name, err)
		}
	}
	if b.ManifestJSON == nil || b.Module == nil {
		return nil, fmt.Errorf("%w: needs both %s and %s", ErrInvalid, ManifestName, ModuleName)
	}
	dec := json.NewDecoder(bytes.NewReader(b.ManifestJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b.Manifest); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, ManifestName, err)
	}
	// One JSON object and nothing else: bytes after it would be covered by
	// the signature yet ignored by every reader.
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: %s has data after its JSON object", ErrInvalid, ManifestName)
	}
	if err := b.Manifest.Validate(); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(b.Module)
	if got := hex.EncodeToString(sum[:]); got != b.Manifest.Module.SHA256 || int64(len(b.Module)) != b.Manifest.Module.Size {
		return nil, fmt.Errorf("%w: module is %d bytes with sha256 %s, manifest pins %d bytes with %s: the module was changed after the manifest was made; rebuild the bundle",
			ErrInvalid, len(b.Module), got, b.Manifest.Module.Size, b.Manifest.Module.SHA256)
	}
	return b, nil
}

// ReadFile reads and decodes a bundle file, naming the file in any error.
func ReadFile(path string) (*Bundle, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxBundleSize+1))
	if err != nil {
		return nil, fmt.Errorf("read bundle %s: %w", path, err)
	}
	b, err := Decode(data)
	if err != nil {
		return nil, fmt.Errorf("bundle %s: %w", path, err)
	}
	return b, nil
}

func digest(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}
