// Package release is the format of a signed agent release: a small JSON
// manifest pinning one agent binary (version, OS, architecture, SHA-256,
// size) and the release-key signatures over exactly its bytes, domain
// trust.DomainAgentRelease. The fleet CLI makes it, the controller stores
// and serves it beside the binary, and the agent checks it before it
// replaces anything.
//
// The controller's rollout engine treats an agent release as a model named
// Model in the pseudo slot Slot: both names start with '@', which no model
// or slot name may, so the two can never collide.
package release

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"

	"github.com/edgefleet/edgefleet/proto/trust"
)

// Names of agent releases in the rollout engine and in events.
const (
	// Slot is the pseudo slot an agent release is rolled out into.
	Slot = "@agent"
	// Model is the pseudo model name of agent releases (Model@VERSION).
	Model = "@agent"
)

// Caps on what is decoded.
const (
	// MaxManifest caps a manifest; a real one is about 200 bytes.
	MaxManifest = 4 << 10
	// MaxDocument caps a signed release document.
	MaxDocument = 32 << 10
	// MaxBinary caps an agent binary (the agent is about 30 MB).
	MaxBinary = 256 << 20
)

// ErrInvalid is wrapped by every error about a malformed manifest or
// document.
var ErrInvalid = errors.New("invalid agent release")

// Manifest pins one agent binary.
type Manifest struct {
	Version string `json:"version"`
	OS      string `json:"os"`
	Arch    string `json:"arch"`
	// SHA256 of the binary, lowercase hex.
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

var (
	versionRE = regexp.MustCompile(`^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(-[0-9A-Za-z.-]{1,40})?$`)
	platRE    = regexp.MustCompile(`^[a-z0-9]{1,16}$`)
	digestRE  = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// ValidVersion reports whether v is a semantic version MAJOR.MINOR.PATCH
// with an optional -prerelease, the only form an agent release may have.
func ValidVersion(v string) bool { return versionRE.MatchString(v) }

// ValidPlatform reports whether s can be an OS or architecture name
// (GOOS, GOARCH).
func ValidPlatform(s string) bool { return platRE.MatchString(s) }

// Validate checks every field; errors wrap ErrInvalid and name the field.
func (m Manifest) Validate() error {
	switch {
	case !ValidVersion(m.Version):
		return fmt.Errorf("%w: version %q: use MAJOR.MINOR.PATCH, e.g. 1.2.0", ErrInvalid, m.Version)
	case !ValidPlatform(m.OS) || !ValidPlatform(m.Arch):
		return fmt.Errorf("%w: os/arch %q/%q: use Go's names, e.g. linux/amd64", ErrInvalid, m.OS, m.Arch)
	case !digestRE.MatchString(m.SHA256):
		return fmt.Errorf("%w: sha256 %q: want 64 lowercase hex digits", ErrInvalid, m.SHA256)
	case m.Size <= 0 || m.Size > MaxBinary:
		return fmt.Errorf("%w: size %d: want 1..%d bytes", ErrInvalid, m.Size, MaxBinary)
	}
	return nil
}

// Platform is "os/arch".
func (m Manifest) Platform() string { return m.OS + "/" + m.Arch }

// Document is a manifest, as its exact signed bytes, with its signatures.
type Document struct {
	Manifest   []byte            `json:"manifest"`
	Signatures []trust.Signature `json:"signatures"`
}

// Sign makes the signed document of m with the release key priv.
func Sign(priv ed25519.PrivateKey, m Manifest) (Document, error) {
	if err := m.Validate(); err != nil {
		return Document{}, err
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return Document{}, err
	}
	return Document{Manifest: raw, Signatures: []trust.Signature{trust.Sign(priv, trust.DomainAgentRelease, raw)}}, nil
}

// Encode returns the document's JSON.
func (d Document) Encode() ([]byte, error) { return json.Marshal(d) }

// Verify checks that one of the signatures is a valid release-key
// signature over the manifest bytes.
func (d Document) Verify(ks *trust.KeySet) error {
	return ks.Verify(trust.DomainAgentRelease, d.Manifest, d.Signatures)
}

// Decode parses a signed document and its manifest strictly (unknown
// fields are errors: a signer must not be able to add fields an older
// agent would skip), without checking the signature: call Verify.
func Decode(b []byte) (Document, Manifest, error) {
	if len(b) > MaxDocument {
		return Document{}, Manifest{}, fmt.Errorf("%w: document is %d bytes, over the %d byte cap", ErrInvalid, len(b), MaxDocument)
	}
	var d Document
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		return Document{}, Manifest{}, fmt.Errorf("%w: document: %v", ErrInvalid, err)
	}
	if len(d.Signatures) > trust.MaxSignatures {
		return Document{}, Manifest{}, fmt.Errorf("%w: %d signatures, at most %d", ErrInvalid, len(d.Signatures), trust.MaxSignatures)
	}
	for i, s := range d.Signatures {
		if len(s.Sig) != ed25519.SignatureSize || len(s.KeyID) != 16 {
			return Document{}, Manifest{}, fmt.Errorf("%w: signature %d: want a 16-digit key id and a %d-byte ed25519 signature", ErrInvalid, i, ed25519.SignatureSize)
		}
	}
	m, err := DecodeManifest(d.Manifest)
	if err != nil {
		return Document{}, Manifest{}, err
	}
	return d, m, nil
}

// DecodeManifest parses and validates manifest bytes.
func DecodeManifest(b []byte) (Manifest, error) {
	if len(b) == 0 || len(b) > MaxManifest {
		return Manifest{}, fmt.Errorf("%w: manifest is %d bytes; want 1..%d", ErrInvalid, len(b), MaxManifest)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, fmt.Errorf("%w: manifest: %v", ErrInvalid, err)
	}
	if err := m.Validate(); err != nil {
		return Manifest{}, err
	}
	return m, nil
}

// Digest is the digest the controller's model table records for agent
// release version: every platform of a release shares it, and the engine
// recognises a device on that version by it. It is not the digest of any
// file; the binaries are pinned by their manifests.
func Digest(version string) string {
	sum := sha256.Sum256([]byte(trust.DomainAgentRelease + "\x00" + version))
	return hex.EncodeToString(sum[:])
}

// DocumentPath is the controller's URL path of the signed document of
// version for os/arch; agents fetch it without a token, like artifacts.
func DocumentPath(version, goos, goarch string) string {
	return BasePath(version) + "/" + goos + "/" + goarch
}

// BasePath is the path DesiredState.agent_release.url names: the agent
// appends "/os/arch".
func BasePath(version string) string { return "/v1/artifacts/agent-releases/" + version }
