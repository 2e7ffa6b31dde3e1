package registry

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"path/filepath"
	"testing"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
)

func signed(t *testing.T, version, arch string, bin []byte) []byte {
	t.Helper()
	_, priv, _ := trust.GenerateKey()
	sum := sha256.Sum256(bin)
	d, err := release.Sign(priv, release.Manifest{Version: version, OS: "linux", Arch: arch, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(bin))})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := d.Encode()
	return raw
}

func TestPushRelease(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg, err := New(dir, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	bin := []byte("an agent binary")
	doc := signed(t, "1.2.0", "amd64", bin)

	rel, created, err := reg.PushRelease(ctx, doc, bytes.NewReader(bin))
	if err != nil || !created || rel.Manifest.Version != "1.2.0" {
		t.Fatalf("push: %+v %v %v", rel, created, err)
	}
	if _, created, err := reg.PushRelease(ctx, doc, bytes.NewReader(bin)); err != nil || created {
		t.Fatalf("push again: created %v, %v; want stored already", created, err)
	}
	f, err := reg.Open(rel.Manifest.SHA256)
	if err != nil {
		t.Fatalf("binary not served as an artifact: %v", err)
	}
	f.Close()
	m, err := st.Model(ctx, release.Model, "1.2.0")
	if err != nil || m.Digest != release.Digest("1.2.0") {
		t.Fatalf("model row for the rollout engine: %+v, %v", m, err)
	}
	if ms, _ := reg.Models(ctx); len(ms) != 0 {
		t.Fatalf("model list shows the release's row: %+v", ms)
	}
	// Another platform of the same version shares the row.
	arm := []byte("an arm64 agent binary")
	if _, _, err := reg.PushRelease(ctx, signed(t, "1.2.0", "arm64", arm), bytes.NewReader(arm)); err != nil {
		t.Fatalf("second platform: %v", err)
	}
	if got, err := reg.Release("1.2.0", "linux", "arm64"); err != nil || got.Manifest.Arch != "arm64" {
		t.Fatalf("release arm64: %+v, %v", got.Manifest, err)
	}
	if rels, err := reg.Releases(ctx); err != nil || len(rels) != 2 {
		t.Fatalf("releases: %d, %v", len(rels), err)
	}

	cases := []struct {
		name string
		doc  []byte
		bin  []byte
		want error
	}{
		{"another binary under the same version", signed(t, "1.2.0", "amd64", []byte("other")), []byte("other"), store.ErrConflict},
		{"binary does not match", signed(t, "1.3.0", "amd64", bin), []byte("tampered binary"), release.ErrInvalid},
		{"binary cut short", signed(t, "1.3.0", "amd64", bin), bin[:3], release.ErrInvalid},
		{"malformed document", []byte(`{"manifest":"e30="}`), bin, release.ErrInvalid},
	}
	for _, c := range cases {
		if _, _, err := reg.PushRelease(ctx, c.doc, bytes.NewReader(c.bin)); !errors.Is(err, c.want) {
			t.Errorf("%s: err %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := reg.Release("1.3.0", "linux", "amd64"); !errors.Is(err, ErrReleaseNotFound) {
		t.Fatalf("a refused release is stored: %v", err)
	}
	if _, err := reg.Release("../etc", "linux", "amd64"); !errors.Is(err, ErrReleaseNotFound) {
		t.Fatalf("malformed version: %v", err)
	}
}
