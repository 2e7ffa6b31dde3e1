package deploy

import (
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/durable"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

// announce signs the announcement of next as the key of role with signer.
func announce(t *testing.T, signer ed25519.PrivateKey, role pb.KeyRole, next ed25519.PrivateKey, seq uint64, issued, retire time.Time) *pb.SignedKeyAnnouncement {
	t.Helper()
	s, err := trust.SignAnnouncement(signer, trust.NewAnnouncement(role, pubOf(next), seq, issued, retire))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func chain(s ...*pb.SignedKeyAnnouncement) *pb.KeyAnnouncements {
	return &pb.KeyAnnouncements{Announcements: s}
}

func TestKeyRotation(t *testing.T) {
	const director = pb.KeyRole_KEY_ROLE_DIRECTOR
	k0, k1, k2, stranger := newKey(t), newKey(t), newKey(t), newKey(t)
	now := time.UnixMilli(1_800_000_000_000)
	clock := func() time.Time { return now }
	dir := t.TempDir()
	newGuard := func() *TrustGuard {
		return &TrustGuard{Release: trust.NewKeySet(pubOf(newKey(t))), Director: trust.NewKeySet(pubOf(k0)), DataDir: dir, Now: clock}
	}
	g := newGuard()
	doc := func(key ed25519.PrivateKey, gen uint64) *pb.SignedDesiredState {
		return directorSigned(t, key, &pb.DesiredState{DeviceId: "dev-1", Generation: gen})
	}
	trusted := func(g *TrustGuard) string {
		ks, err := g.KeySet(director)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(ks.IDs(), ",")
	}
	ids := func(keys ...ed25519.PrivateKey) string {
		ks := trust.NewKeySet()
		for _, k := range keys {
			ks.Add(pubOf(k))
		}
		return strings.Join(ks.IDs(), ",")
	}

	// A state signed by the next key before its announcement: refused,
	// and kept to be offered again.
	early := doc(k1, 5)
	if err := g.CheckDesired(early); !errors.Is(err, trust.ErrUnknownKey) {
		t.Fatalf("unannounced key: %v", err)
	}

	// An announcement signed by a key the agent does not trust: refused,
	// reported once however often the broker redelivers it.
	forged := chain(announce(t, stranger, director, stranger, 1, now, time.Time{}))
	if _, err := g.ApplyKeys(forged); !errors.Is(err, trust.ErrUnknownKey) {
		t.Fatalf("forged announcement: %v", err)
	}
	if ch, err := g.ApplyKeys(forged); err != nil || len(ch) != 0 {
		t.Fatalf("forged announcement again: %v %v", ch, err)
	}
	if got := trusted(g); got != ids(k0) {
		t.Fatalf("trusted after a forged announcement: %s", got)
	}

	// k0 announces k1 with an hour of overlap.
	a1 := announce(t, k0, director, k1, 1, now, now.Add(time.Hour))
	ch, err := g.ApplyKeys(chain(a1))
	if err != nil || len(ch) != 1 || ch[0].KeyID != trust.KeyID(pubOf(k1)) || ch[0].Role != "director" || ch[0].Sequence != 1 {
		t.Fatalf("ApplyKeys = %+v, %v", ch, err)
	}
	if got := trusted(g); got != ids(k0, k1) {
		t.Fatalf("trusted in the overlap window: %s", got)
	}
	if g.TakePendingDesired() != early || g.TakePendingDesired() != nil {
		t.Fatal("the early desired state is not pending exactly once")
	}
	for _, k := range []ed25519.PrivateKey{k0, k1} {
		if err := g.CheckDesired(doc(k, 6)); err != nil {
			t.Fatalf("state signed by %s in the overlap window: %v", trust.KeyID(pubOf(k)), err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, TrustFile)); err != nil {
		t.Fatalf("trust.json not written: %v", err)
	}

	// The window ends: k0 is no longer trusted, also by a new guard made
	// from the same configuration (which still lists k0) after a restart.
	now = now.Add(time.Hour + time.Second)
	for name, g := range map[string]*TrustGuard{"running": g, "restarted": newGuard()} {
		if err := g.CheckDesired(doc(k0, 7)); !errors.Is(err, trust.ErrUnknownKey) {
			t.Fatalf("%s: state signed by the retired key: %v", name, err)
		}
		if err := g.CheckDesired(doc(k1, 7)); err != nil {
			t.Fatalf("%s: state signed by the new key: %v", name, err)
		}
	}

	// The state accepted last, signed by the retired key, is still
	// recognised when the broker redelivers it.
	accepted := doc(k0, 4)
	raw, _ := proto.MarshalOptions{Deterministic: true}.Marshal(accepted)
	if err := durable.WriteFile(filepath.Join(dir, DesiredFile), raw); err != nil {
		t.Fatal(err)
	}
	if err := g.CheckDesired(accepted); err != nil {
		t.Fatalf("redelivered accepted state: %v", err)
	}

	// k1 announces k2, retiring k1 at once. The retained chain holds both.
	a2 := announce(t, k1, director, k2, 2, now, time.Time{})
	if ch, err := g.ApplyKeys(chain(a1, a2)); err != nil || len(ch) != 1 || ch[0].Sequence != 2 {
		t.Fatalf("chain of two = %+v, %v", ch, err)
	}
	if got := trusted(g); got != ids(k2) {
		t.Fatalf("trusted after an immediate retirement: %s", got)
	}
	// Redelivered: nothing to do, nothing refused.
	if ch, err := g.ApplyKeys(chain(a1, a2)); err != nil || len(ch) != 0 {
		t.Fatalf("redelivered chain = %+v, %v", ch, err)
	}
	// An old announcement alone is a replay.
	if _, err := g.ApplyKeys(chain(a1)); !errors.Is(err, trust.ErrReplay) {
		t.Fatalf("replayed announcement 1: %v", err)
	}
	// One signed by a trusted key but with an old sequence: a replay too.
	stale := announce(t, k2, director, k1, 2, now, time.Time{})
	if _, err := g.ApplyKeys(chain(stale)); !errors.Is(err, trust.ErrReplay) {
		t.Fatalf("stale sequence: %v", err)
	}
	if got := trusted(newGuard()); got != ids(k2) {
		t.Fatalf("trusted after restart: %s", got)
	}

	// A fresh agent configured with k2 catches up silently from the chain.
	fresh := &TrustGuard{Director: trust.NewKeySet(pubOf(k2)), DataDir: t.TempDir(), Now: clock}
	if ch, err := fresh.ApplyKeys(chain(a1, a2)); err != nil || len(ch) != 0 {
		t.Fatalf("fresh agent = %+v, %v", ch, err)
	}

	// A damaged trust.json fails closed.
	if err := os.WriteFile(filepath.Join(dir, TrustFile), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := newGuard().CheckDesired(doc(k2, 9)); err == nil || !strings.Contains(err.Error(), TrustFile) {
		t.Fatalf("damaged trust.json: %v", err)
	}
}

// TestReleaseKeyRotation: a bundle signed only by the new release key is
// refused before the announcement and installed after it.
func TestReleaseKeyRotation(t *testing.T) {
	old, next := newKey(t), newKey(t)
	g := &TrustGuard{Release: trust.NewKeySet(pubOf(old)), Director: trust.NewKeySet(pubOf(newKey(t))), DataDir: t.TempDir()}
	b := signBundle(t, mustBundle(t), next)
	if err := g.CheckBundle(b); err == nil {
		t.Fatal("bundle signed by an unannounced key accepted")
	}
	// Signed by the director key instead of the release key: refused.
	wrongRole := announce(t, newKey(t), pb.KeyRole_KEY_ROLE_RELEASE, next, 1, time.Now(), time.Time{})
	if _, err := g.ApplyKeys(chain(wrongRole)); err == nil {
		t.Fatal("release announcement by a stranger applied")
	}
	if _, err := g.ApplyKeys(chain(announce(t, old, pb.KeyRole_KEY_ROLE_RELEASE, next, 1, time.Now(), time.Now().Add(time.Hour)))); err != nil {
		t.Fatal(err)
	}
	if err := g.CheckBundle(b); err != nil {
		t.Fatalf("bundle signed by the announced key: %v", err)
	}
	if err := g.CheckBundle(signBundle(t, mustBundle(t), old)); err != nil {
		t.Fatalf("bundle signed by the old key in the overlap window: %v", err)
	}
}

func FuzzDecodeKeyState(f *testing.F) {
	pub := pubOf(newKeyF(f))
	f.Add([]byte(`{"roles":{"director":{"sequence":2,"keys":[{"id":"` + trust.KeyID(pub) + `","public_key":"` + b64(pub) + `"}],"retired":["0011223344556677"]}}}`))
	f.Add([]byte(`{"roles":{"release":null}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := decodeKeyState(b)
		if err != nil {
			return
		}
		for name, rk := range st.Roles {
			if _, err := trust.ParseRole(name); err != nil || rk == nil {
				t.Fatalf("accepted role %q", name)
			}
			for _, k := range rk.Keys {
				if len(k.PublicKey) != ed25519.PublicKeySize {
					t.Fatalf("accepted a %d-byte key", len(k.PublicKey))
				}
			}
		}
	})
}

func mustBundle(t *testing.T) *bundle.Bundle {
	t.Helper()
	man := bundle.Manifest{Name: "m", Version: "1.0.0",
		Inputs: []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{1}}}, Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{1}}}}
	return modeltest.Bundle(t, man, []byte("\x00asm\x01\x00\x00\x00"))
}

func newKeyF(f *testing.F) ed25519.PrivateKey {
	_, priv, err := trust.GenerateKey()
	if err != nil {
		f.Fatal(err)
	}
	return priv
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
