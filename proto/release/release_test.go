package release

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/proto/trust"
)

func manifest() Manifest {
	sum := sha256.Sum256([]byte("binary"))
	return Manifest{Version: "1.2.0", OS: "linux", Arch: "amd64", SHA256: hex.EncodeToString(sum[:]), Size: 6}
}

func TestSignDecodeVerify(t *testing.T) {
	pub, priv, _ := trust.GenerateKey()
	other, _, _ := trust.GenerateKey()
	d, err := Sign(priv, manifest())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := d.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, m, err := Decode(raw)
	if err != nil {
		t.Fatal(err)
	}
	if m != manifest() {
		t.Fatalf("manifest %+v, want %+v", m, manifest())
	}
	if err := got.Verify(trust.NewKeySet(pub)); err != nil {
		t.Fatalf("good signature refused: %v", err)
	}
	if err := got.Verify(trust.NewKeySet(other)); !errors.Is(err, trust.ErrUnknownKey) {
		t.Fatalf("unknown key: %v", err)
	}
	// A manifest changed after signing (a bigger version) must not verify.
	got.Manifest = []byte(strings.Replace(string(got.Manifest), "1.2.0", "9.2.0", 1))
	if err := got.Verify(trust.NewKeySet(pub)); !errors.Is(err, trust.ErrBadSig) {
		t.Fatalf("tampered manifest: %v", err)
	}
	// A bundle signature is not a release signature.
	bsig := trust.Sign(priv, trust.DomainBundleManifest, d.Manifest)
	if err := (Document{Manifest: d.Manifest, Signatures: []trust.Signature{bsig}}).Verify(trust.NewKeySet(pub)); !errors.Is(err, trust.ErrBadSig) {
		t.Fatalf("signature of another domain: %v", err)
	}
}

func TestManifestValidate(t *testing.T) {
	cases := []struct {
		name string
		edit func(*Manifest)
		want string
	}{
		{"ok", func(*Manifest) {}, ""},
		{"prerelease", func(m *Manifest) { m.Version = "1.2.0-rc.1" }, ""},
		{"bad version", func(m *Manifest) { m.Version = "1.2" }, "version"},
		{"leading zero", func(m *Manifest) { m.Version = "01.2.0" }, "version"},
		{"bad os", func(m *Manifest) { m.OS = "Linux" }, "os/arch"},
		{"bad digest", func(m *Manifest) { m.SHA256 = "abc" }, "sha256"},
		{"zero size", func(m *Manifest) { m.Size = 0 }, "size"},
		{"huge", func(m *Manifest) { m.Size = MaxBinary + 1 }, "size"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := manifest()
			c.edit(&m)
			err := m.Validate()
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err %v, want one about %s", err, c.want)
			}
		})
	}
}

func TestDecodeRefuses(t *testing.T) {
	for name, doc := range map[string]string{
		"unknown field": `{"manifest":"e30=","signatures":[],"extra":1}`,
		"empty":         `{}`,
		"not json":      `nope`,
		"huge":          `{"manifest":"` + strings.Repeat("A", MaxDocument) + `"}`,
	} {
		if _, _, err := Decode([]byte(doc)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err %v, want ErrInvalid", name, err)
		}
	}
}

func TestDigestPerVersion(t *testing.T) {
	if Digest("1.0.0") == Digest("1.0.1") || len(Digest("1.0.0")) != 64 {
		t.Fatal("release digests must differ by version and be 64 hex digits")
	}
}

func FuzzDecode(f *testing.F) {
	_, priv, _ := trust.GenerateKey()
	d, _ := Sign(priv, manifest())
	raw, _ := d.Encode()
	f.Add(raw)
	f.Add([]byte(`{"manifest":"e30=","signatures":[]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, m, err := Decode(b)
		if err != nil {
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("decoded manifest does not validate: %v", err)
		}
		if len(d.Manifest) > MaxManifest {
			t.Fatal("manifest over the cap decoded")
		}
	})
}
