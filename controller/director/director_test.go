package director

import (
	"crypto/ed25519"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

func TestLoadOrCreateKey(t *testing.T) {
	dir := t.TempDir()
	priv, created, err := LoadOrCreateKey(dir)
	if err != nil || !created {
		t.Fatalf("first start: created %v, %v", created, err)
	}
	privPath := filepath.Join(dir, KeysDir, PrivateKeyFile)
	pubPath := filepath.Join(dir, KeysDir, PublicKeyFile)
	if fi, err := os.Stat(privPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("director.key: %v, %v", fi, err)
	}
	pub, err := trust.ReadPublicKey(pubPath)
	if err != nil || !pub.Equal(priv.Public()) {
		t.Fatalf("director.pub does not hold the key's public half: %v", err)
	}

	// Second start: the same key; a lost director.pub is written again.
	if err := os.Remove(pubPath); err != nil {
		t.Fatal(err)
	}
	again, created, err := LoadOrCreateKey(dir)
	if err != nil || created || !again.Equal(priv) {
		t.Fatalf("second start: created %v, same key %v, %v", created, again.Equal(priv), err)
	}
	if pub, err := trust.ReadPublicKey(pubPath); err != nil || !pub.Equal(priv.Public()) {
		t.Fatalf("director.pub not restored: %v", err)
	}

	// A damaged key is an error that says what to do, never a new key.
	if err := os.WriteFile(privPath, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateKey(dir); err == nil {
		t.Fatal("damaged director.key accepted")
	}
}

func TestBuildSignsAndExpires(t *testing.T) {
	_, priv, err := trust.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	issued := time.UnixMilli(1_700_000_000_000)
	cases := []struct {
		name       string
		key        ed25519.PrivateKey
		expiry     time.Duration
		wantExpiry time.Time
	}{
		{"default expiry", priv, 0, issued.Add(DefaultExpiry)},
		{"set expiry", priv, time.Hour, issued.Add(time.Hour)},
		{"no expiry", priv, -1, time.Time{}},
		{"no key", nil, 0, issued.Add(DefaultExpiry)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := New(Options{Key: c.key, Expiry: c.expiry})
			ds := &store.Desired{DeviceID: "dev-1", Generation: 3, IssuedAt: issued,
				Slots: []store.DesiredSlot{{Slot: "default", Model: "m", Version: "1.0.0", Digest: "ab", Size: 1, Rollback: true}}}
			if err := d.build(ds); err != nil {
				t.Fatal(err)
			}
			var sd pb.SignedDesiredState
			if err := proto.Unmarshal(ds.Doc, &sd); err != nil {
				t.Fatal(err)
			}
			var want pb.DesiredState
			if err := proto.Unmarshal(sd.GetDesired(), &want); err != nil {
				t.Fatal(err)
			}
			var exp time.Time
			if ms := want.GetExpiresAtUnixMs(); ms != 0 {
				exp = time.UnixMilli(ms)
			}
			if !exp.Equal(c.wantExpiry) || want.GetDeviceId() != "dev-1" || want.GetGeneration() != 3 || !want.GetSlots()[0].GetRollback() {
				t.Fatalf("desired state %v; want expiry %v", &want, c.wantExpiry)
			}
			ks := trust.NewKeySet(priv.Public().(ed25519.PublicKey))
			err := ks.Verify(trust.DomainDesiredState, sd.GetDesired(), []trust.Signature{{KeyID: sd.GetKeyId(), Sig: sd.GetSignature()}})
			if c.key == nil {
				if len(sd.GetSignature()) != 0 {
					t.Fatal("signed without a key")
				}
				return
			}
			if err != nil {
				t.Fatalf("signature does not verify: %v", err)
			}
			// The signature is over the desired bytes and this domain only.
			if err := ks.Verify(trust.DomainBundleManifest, sd.GetDesired(), []trust.Signature{{KeyID: sd.GetKeyId(), Sig: sd.GetSignature()}}); !errors.Is(err, trust.ErrBadSig) {
				t.Fatalf("signature verifies for another domain: %v", err)
			}
		})
	}
}
