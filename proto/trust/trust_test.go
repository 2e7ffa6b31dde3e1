package trust

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestSignVerify(t *testing.T) {
	pub1, priv1, _ := GenerateKey()
	pub2, priv2, _ := GenerateKey()
	msg := []byte(`{"name":"m","version":"1.0.0"}`)
	ks := NewKeySet(pub1)

	if err := ks.Verify(DomainBundleManifest, msg, []Signature{Sign(priv1, DomainBundleManifest, msg)}); err != nil {
		t.Fatalf("good signature refused: %v", err)
	}
	cases := []struct {
		name string
		sigs []Signature
		msg  []byte
		dom  string
		want error
	}{
		{"unsigned", nil, msg, DomainBundleManifest, ErrUnsigned},
		{"unknown key", []Signature{Sign(priv2, DomainBundleManifest, msg)}, msg, DomainBundleManifest, ErrUnknownKey},
		{"tampered", []Signature{Sign(priv1, DomainBundleManifest, msg)}, []byte(`{"name":"m","version":"9.0.0"}`), DomainBundleManifest, ErrBadSig},
		{"other domain", []Signature{Sign(priv1, DomainDesiredState, msg)}, msg, DomainBundleManifest, ErrBadSig},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := ks.Verify(c.dom, c.msg, c.sigs); !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
		})
	}

	// Rotation: a bundle signed by old and new key verifies under either set.
	both := []Signature{Sign(priv1, DomainBundleManifest, msg), Sign(priv2, DomainBundleManifest, msg)}
	if err := NewKeySet(pub2).Verify(DomainBundleManifest, msg, both); err != nil {
		t.Fatalf("new-key set refused a dual-signed message: %v", err)
	}
}

func TestSignatureDocRoundTrip(t *testing.T) {
	_, priv, _ := GenerateKey()
	s := Sign(priv, DomainBundleManifest, []byte("x"))
	b, err := EncodeSignatures([]Signature{s})
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeSignatures(b)
	if err != nil || len(got) != 1 || got[0].KeyID != s.KeyID {
		t.Fatalf("got %v, %v", got, err)
	}
	for _, bad := range []string{`{`, `{"signatures":[{"keyid":"ab","sig":"AAAA"}]}`} {
		if _, err := DecodeSignatures([]byte(bad)); err == nil {
			t.Errorf("DecodeSignatures(%q) accepted", bad)
		}
	}
}

func TestKeyFiles(t *testing.T) {
	dir := t.TempDir()
	pub, priv, _ := GenerateKey()
	pb, _ := MarshalPublicKey(pub)
	kb, _ := MarshalPrivateKey(priv)
	os.WriteFile(filepath.Join(dir, "k.pub"), pb, 0o644)
	os.WriteFile(filepath.Join(dir, "k.key"), kb, 0o600)
	gotPub, err := ReadPublicKey(filepath.Join(dir, "k.pub"))
	if err != nil || !gotPub.Equal(pub) {
		t.Fatalf("public key: %v", err)
	}
	gotPriv, err := ReadPrivateKey(filepath.Join(dir, "k.key"))
	if err != nil || !gotPriv.Equal(priv) {
		t.Fatalf("private key: %v", err)
	}
	if _, err := ReadPublicKey(filepath.Join(dir, "k.key")); err == nil {
		t.Fatal("a private key file was read as a public key")
	}
}

func FuzzDecodeSignatures(f *testing.F) {
	_, priv, _ := GenerateKey()
	b, _ := EncodeSignatures([]Signature{Sign(priv, DomainBundleManifest, []byte("x"))})
	f.Add(b)
	f.Add([]byte(`{"signatures":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		sigs, err := DecodeSignatures(b)
		if err == nil && len(sigs) > MaxSignatures {
			t.Fatalf("%d signatures accepted", len(sigs))
		}
	})
}
