package trust

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// Caps on key announcements. A real announcement is about 100 bytes; the
// chain grows by one per rotation, and a fleet rotates a few times a year.
const (
	MaxAnnouncement  = 1 << 10
	MaxAnnouncements = 64
	// MaxAnnouncementsDoc caps a serialized KeyAnnouncements or
	// SignedKeyAnnouncement file (`fleet keys rotate-release --out`).
	MaxAnnouncementsDoc = MaxAnnouncements * (MaxAnnouncement + 128)
)

// ErrReplay is returned for an announcement whose sequence is not above
// the last one applied.
var ErrReplay = errors.New("announcement replayed")

// RoleName is the lowercase name of a key role: release or director.
func RoleName(r pb.KeyRole) string {
	switch r {
	case pb.KeyRole_KEY_ROLE_RELEASE:
		return "release"
	case pb.KeyRole_KEY_ROLE_DIRECTOR:
		return "director"
	}
	return fmt.Sprintf("role(%d)", int32(r))
}

// ParseRole parses release or director.
func ParseRole(s string) (pb.KeyRole, error) {
	switch s {
	case "release":
		return pb.KeyRole_KEY_ROLE_RELEASE, nil
	case "director":
		return pb.KeyRole_KEY_ROLE_DIRECTOR, nil
	}
	return 0, fmt.Errorf("key role %q: use release or director", s)
}

// NewAnnouncement builds the announcement of pub as the key of role.
// retirePrevious is when the keys trusted before it stop being trusted;
// the zero time retires them as soon as an agent applies it.
func NewAnnouncement(role pb.KeyRole, pub ed25519.PublicKey, seq uint64, issued, retirePrevious time.Time) *pb.KeyAnnouncement {
	a := &pb.KeyAnnouncement{
		Role: role, PublicKey: pub, KeyId: KeyID(pub), Sequence: seq,
		IssuedAtUnixMs: issued.UnixMilli(),
	}
	if !retirePrevious.IsZero() {
		a.RetirePreviousAtUnixMs = retirePrevious.UnixMilli()
	}
	return a
}

// SignAnnouncement serializes a and signs the bytes with priv, which must
// be a key trusted for a's role now (the old key of a rotation).
func SignAnnouncement(priv ed25519.PrivateKey, a *pb.KeyAnnouncement) (*pb.SignedKeyAnnouncement, error) {
	raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(a)
	if err != nil {
		return nil, fmt.Errorf("key announcement: %w", err)
	}
	if _, err := checkAnnouncement(raw); err != nil {
		return nil, err
	}
	sig := Sign(priv, DomainKeyRotation, raw)
	return &pb.SignedKeyAnnouncement{Announcement: raw, Signature: sig.Sig, KeyId: sig.KeyID}, nil
}

// DecodeAnnouncement decodes and checks the form of a signed announcement:
// sizes, a known role, a 32-byte key whose id matches, a sequence of at
// least 1, a signature of the right size. It does not verify the
// signature: that needs the receiver's keys (VerifyAnnouncement).
func DecodeAnnouncement(s *pb.SignedKeyAnnouncement) (*pb.KeyAnnouncement, error) {
	if len(s.GetSignature()) != ed25519.SignatureSize || len(s.GetKeyId()) != 16 {
		return nil, fmt.Errorf("key announcement: want a 16-digit signer key id and a %d-byte ed25519 signature", ed25519.SignatureSize)
	}
	return checkAnnouncement(s.GetAnnouncement())
}

func checkAnnouncement(raw []byte) (*pb.KeyAnnouncement, error) {
	if len(raw) == 0 {
		return nil, errors.New("key announcement is empty")
	}
	if len(raw) > MaxAnnouncement {
		return nil, fmt.Errorf("key announcement is %d bytes, over the %d byte cap", len(raw), MaxAnnouncement)
	}
	a := &pb.KeyAnnouncement{}
	if err := proto.Unmarshal(raw, a); err != nil {
		return nil, fmt.Errorf("key announcement does not decode: %w", err)
	}
	if a.GetRole() != pb.KeyRole_KEY_ROLE_RELEASE && a.GetRole() != pb.KeyRole_KEY_ROLE_DIRECTOR {
		return nil, fmt.Errorf("key announcement: unknown role %d", int32(a.GetRole()))
	}
	if len(a.GetPublicKey()) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("key announcement: public key is %d bytes, want %d (ed25519)", len(a.GetPublicKey()), ed25519.PublicKeySize)
	}
	if id := KeyID(a.GetPublicKey()); a.GetKeyId() != id {
		return nil, fmt.Errorf("key announcement: key id %q does not match the key (%s)", a.GetKeyId(), id)
	}
	if a.GetSequence() == 0 {
		return nil, errors.New("key announcement: sequence 0; sequences start at 1")
	}
	if a.GetRetirePreviousAtUnixMs() < 0 {
		return nil, errors.New("key announcement: negative retirement time")
	}
	return a, nil
}

// VerifyAnnouncement checks s's form and its signature by one of ks, the
// keys trusted now for the role s announces a key for.
func VerifyAnnouncement(ks *KeySet, s *pb.SignedKeyAnnouncement) (*pb.KeyAnnouncement, error) {
	a, err := DecodeAnnouncement(s)
	if err != nil {
		return nil, err
	}
	if ks == nil || ks.Len() == 0 {
		return nil, fmt.Errorf("%s key announcement %d (key %s): no %s key is trusted here to check it against", RoleName(a.GetRole()), a.GetSequence(), a.GetKeyId(), RoleName(a.GetRole()))
	}
	if err := ks.Verify(DomainKeyRotation, s.GetAnnouncement(), []Signature{{KeyID: s.GetKeyId(), Sig: s.GetSignature()}}); err != nil {
		return nil, fmt.Errorf("%s key announcement %d (key %s): %w", RoleName(a.GetRole()), a.GetSequence(), a.GetKeyId(), err)
	}
	return a, nil
}

// DecodeAnnouncements decodes a serialized KeyAnnouncements message (the
// retained chain, or a file of one or more announcements) with its caps,
// checking the form of each announcement.
func DecodeAnnouncements(b []byte) (*pb.KeyAnnouncements, error) {
	if len(b) > MaxAnnouncementsDoc {
		return nil, fmt.Errorf("key announcements: %d bytes, over the %d byte cap", len(b), MaxAnnouncementsDoc)
	}
	ka := &pb.KeyAnnouncements{}
	if err := proto.Unmarshal(b, ka); err != nil {
		return nil, fmt.Errorf("key announcements do not decode: %w", err)
	}
	if err := CheckAnnouncements(ka); err != nil {
		return nil, err
	}
	return ka, nil
}

// CheckAnnouncements checks the count and the form of each announcement.
func CheckAnnouncements(ka *pb.KeyAnnouncements) error {
	if n := len(ka.GetAnnouncements()); n > MaxAnnouncements {
		return fmt.Errorf("key announcements: %d, at most %d are read", n, MaxAnnouncements)
	}
	for i, s := range ka.GetAnnouncements() {
		if _, err := DecodeAnnouncement(s); err != nil {
			return fmt.Errorf("key announcement %d: %w", i, err)
		}
	}
	return nil
}

// PublicKey returns the announced key.
func PublicKey(a *pb.KeyAnnouncement) ed25519.PublicKey {
	return ed25519.PublicKey(a.GetPublicKey())
}
