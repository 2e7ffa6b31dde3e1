// Package trust holds the signing primitives both keys of Edgefleet use:
// the release key (operators; signs model bundles and agent releases) and
// the director key (the controller; signs each device's desired state).
//
// Keys are ed25519. A key is named by its key id, the first 16 hex digits
// of the SHA-256 of the public key. Every signature is made over a domain
// string and the message, so a signature made for one purpose (a bundle
// manifest) can never be replayed as another (a desired state).
package trust

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
)

// Domains separate what a signature is for.
const (
	DomainBundleManifest = "edgefleet/bundle-manifest/v1"
	DomainDesiredState   = "edgefleet/desired-state/v1"
	DomainAgentRelease   = "edgefleet/agent-release/v1"
	DomainKeyRotation    = "edgefleet/key-rotation/v1"
)

// Caps on what is decoded.
const (
	MaxSignatures   = 8
	MaxSignatureDoc = 16 << 10
	MaxKeyFile      = 16 << 10
)

// Sentinel errors callers branch on.
var (
	ErrUnsigned   = errors.New("not signed")
	ErrUnknownKey = errors.New("signed by an unknown key")
	ErrBadSig     = errors.New("signature does not verify")
)

// KeyID names a public key.
func KeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:8])
}

// Signature is one signature with the id of the key that made it.
type Signature struct {
	KeyID string `json:"keyid"`
	Sig   []byte `json:"sig"`
}

func signed(domain string, msg []byte) []byte {
	out := make([]byte, 0, len(domain)+1+len(msg))
	out = append(out, domain...)
	out = append(out, 0)
	return append(out, msg...)
}

// Sign signs msg for domain with priv.
func Sign(priv ed25519.PrivateKey, domain string, msg []byte) Signature {
	pub := priv.Public().(ed25519.PublicKey)
	return Signature{KeyID: KeyID(pub), Sig: ed25519.Sign(priv, signed(domain, msg))}
}

// KeySet is the set of public keys trusted for one role. Holding more than
// one is how rotation works: the new key is added before the old one is
// retired.
type KeySet struct {
	keys map[string]ed25519.PublicKey
}

// NewKeySet returns a set holding pubs.
func NewKeySet(pubs ...ed25519.PublicKey) *KeySet {
	ks := &KeySet{keys: map[string]ed25519.PublicKey{}}
	for _, p := range pubs {
		ks.Add(p)
	}
	return ks
}

// Add trusts pub.
func (ks *KeySet) Add(pub ed25519.PublicKey) { ks.keys[KeyID(pub)] = pub }

// Remove stops trusting the key with id.
func (ks *KeySet) Remove(id string) { delete(ks.keys, id) }

// IDs lists the trusted key ids, sorted.
func (ks *KeySet) IDs() []string {
	ids := make([]string, 0, len(ks.keys))
	for id := range ks.keys {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Key returns the trusted key with id.
func (ks *KeySet) Key(id string) (ed25519.PublicKey, bool) {
	pub, ok := ks.keys[id]
	return pub, ok
}

// Len is the number of trusted keys.
func (ks *KeySet) Len() int { return len(ks.keys) }

// Verify succeeds when at least one of sigs is a valid signature of msg for
// domain by a trusted key. Its error says which keys signed and which are
// trusted, so an operator can tell a rotation problem from tampering.
func (ks *KeySet) Verify(domain string, msg []byte, sigs []Signature) error {
	if len(sigs) == 0 {
		return ErrUnsigned
	}
	if len(sigs) > MaxSignatures {
		return fmt.Errorf("%d signatures, at most %d are read: %w", len(sigs), MaxSignatures, ErrBadSig)
	}
	var unknown []string
	for _, s := range sigs {
		pub, ok := ks.keys[s.KeyID]
		if !ok {
			unknown = append(unknown, s.KeyID)
			continue
		}
		if ed25519.Verify(pub, signed(domain, msg), s.Sig) {
			return nil
		}
		return fmt.Errorf("key %s: %w (the signed content was changed, or signed for another purpose)", s.KeyID, ErrBadSig)
	}
	return fmt.Errorf("keys %s: %w; trusted keys are %s", strings.Join(unknown, ","), ErrUnknownKey, strings.Join(ks.IDs(), ","))
}

// EncodeSignatures returns the JSON document of a bundle's manifest.sig.
func EncodeSignatures(sigs []Signature) ([]byte, error) {
	return json.Marshal(struct {
		Signatures []Signature `json:"signatures"`
	}{sigs})
}

// DecodeSignatures parses a manifest.sig document.
func DecodeSignatures(b []byte) ([]Signature, error) {
	if len(b) > MaxSignatureDoc {
		return nil, fmt.Errorf("signature document is %d bytes, over the %d byte limit", len(b), MaxSignatureDoc)
	}
	var doc struct {
		Signatures []Signature `json:"signatures"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("signature document: %w", err)
	}
	if len(doc.Signatures) > MaxSignatures {
		return nil, fmt.Errorf("signature document has %d signatures, at most %d allowed", len(doc.Signatures), MaxSignatures)
	}
	for i, s := range doc.Signatures {
		if len(s.Sig) != ed25519.SignatureSize || len(s.KeyID) != 16 {
			return nil, fmt.Errorf("signature %d: want a 16-digit key id and a %d-byte ed25519 signature", i, ed25519.SignatureSize)
		}
	}
	return doc.Signatures, nil
}

// GenerateKey makes a new ed25519 key pair.
func GenerateKey() (ed25519.PublicKey, ed25519.PrivateKey, error) {
	return ed25519.GenerateKey(rand.Reader)
}

// MarshalPrivateKey encodes priv as PKCS#8 PEM.
func MarshalPrivateKey(priv ed25519.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// MarshalPublicKey encodes pub as PKIX PEM.
func MarshalPublicKey(pub ed25519.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

func readPEM(path, want string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxKeyFile {
		return nil, fmt.Errorf("key file %s is %d bytes; a key file is a few hundred", path, len(b))
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != want {
		return nil, fmt.Errorf("key file %s: no %q PEM block; use a file written by `fleet keys init`", path, want)
	}
	return block.Bytes, nil
}

// ReadPrivateKey reads a PKCS#8 PEM ed25519 private key file.
func ReadPrivateKey(path string) (ed25519.PrivateKey, error) {
	der, err := readPEM(path, "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key file %s holds a %T key; Edgefleet keys are ed25519", path, k)
	}
	return priv, nil
}

// ReadPublicKey reads a PKIX PEM ed25519 public key file.
func ReadPublicKey(path string) (ed25519.PublicKey, error) {
	der, err := readPEM(path, "PUBLIC KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("key file %s holds a %T key; Edgefleet keys are ed25519", path, k)
	}
	return pub, nil
}
