package cli

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/proto/trust"
)

func run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = Main(args, &o, &e)
	return code, o.String(), e.String()
}

func TestUsageErrors(t *testing.T) {
	// Nothing listens here, so a test that reaches the network fails loudly
	// with a connection error rather than passing by accident.
	t.Setenv("EDGEFLEET_CONTROLLER", "http://127.0.0.1:1")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "usage: fleet COMMAND"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"assign", "grid-anomaly", "-l", "a=b"}, 2, "NAME@VERSION"},
		{[]string{"assign", "grid-anomaly@1.0.0"}, 2, "no selector"},
		{[]string{"device"}, 2, "exactly one device id"},
		{[]string{"devices", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"devices", "-o", "xml"}, 1, `-o "xml"`},
		{[]string{"devices", "--controller", "ftp://x"}, 1, "want http://host:port"},
		{[]string{"model"}, 2, "want a subcommand"},
		{[]string{"model", "push"}, 2, "want one BUNDLE"},
		{[]string{"model", "push", "/nonexistent.bundle"}, 1, "/nonexistent.bundle"},
		{[]string{"devices"}, 1, "cannot reach the controller at http://127.0.0.1:1"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			code, _, stderr := run(t, c.args...)
			if code != c.code || !strings.Contains(stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, stderr, c.code, c.want)
			}
		})
	}
}

func TestModelBuildFromWasm(t *testing.T) {
	dir := t.TempDir()
	module := filepath.Join(dir, "m.wasm")
	manifest := filepath.Join(dir, "manifest.json")
	out := filepath.Join(dir, "m.bundle")
	// The bundle format does not run the module, so any bytes do here.
	if err := os.WriteFile(module, []byte("\x00asm\x01\x00\x00\x00"), 0o644); err != nil {
		t.Fatal(err)
	}
	mj := `{"abi":1,"name":"tiny","version":"0.1.0","inputs":[{"name":"x","datatype":"FP32","shape":[-1,1]}],"outputs":[{"name":"y","datatype":"FP32","shape":[-1]}]}`
	if err := os.WriteFile(manifest, []byte(mj), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := run(t, "model", "build", "--from", "wasm", "--module", module, "--manifest", manifest, "--out", out)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	b, err := bundle.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if b.Manifest.Name != "tiny" || !strings.Contains(stdout, b.Digest) {
		t.Fatalf("bundle %+v, stdout %q", b.Manifest, stdout)
	}

	// A manifest with a bad version is refused, naming the file.
	if err := os.WriteFile(manifest, []byte(strings.Replace(mj, "0.1.0", "one", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = run(t, "model", "build", "--from", "wasm", "--module", module, "--manifest", manifest, "--out", out)
	if code != 1 || !strings.Contains(stderr, manifest) || !strings.Contains(stderr, "semantic version") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
}

func TestKeysInitAndSign(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	if code, _, stderr := run(t, "keys", "init", "--dir", keys); code != 0 {
		t.Fatalf("keys init: %s", stderr)
	}
	if code, _, stderr := run(t, "keys", "init", "--dir", keys); code != 1 || !strings.Contains(stderr, "refusing to overwrite") {
		t.Fatalf("second keys init: exit %d %s", code, stderr)
	}
	if fi, err := os.Stat(filepath.Join(keys, "release.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("release.key: %v %v", fi, err)
	}

	b, err := bundle.New(bundle.Manifest{ABI: 1, Name: "tiny", Version: "0.1.0",
		Inputs:  []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}}}, []byte("\x00asm\x01\x00\x00\x00"))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := b.Encode()
	path := filepath.Join(dir, "tiny.bundle")
	os.WriteFile(path, data, 0o644)

	if code, _, stderr := run(t, "model", "sign", path, "--key", filepath.Join(keys, "release.key")); code != 0 {
		t.Fatalf("sign: %s", stderr)
	}
	signed, err := bundle.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sigs, err := trust.DecodeSignatures(signed.Signature)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := trust.ReadPublicKey(filepath.Join(keys, "release.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if err := trust.NewKeySet(pub).Verify(trust.DomainBundleManifest, signed.ManifestJSON, sigs); err != nil {
		t.Fatalf("signature made by fleet model sign does not verify: %v", err)
	}

	// Rotation: signing with a second key keeps the first signature.
	keys2 := filepath.Join(dir, "keys2")
	run(t, "keys", "init", "--dir", keys2)
	if code, _, stderr := run(t, "model", "sign", path, "--key", filepath.Join(keys2, "release.key")); code != 0 {
		t.Fatalf("second sign: %s", stderr)
	}
	twice, _ := bundle.ReadFile(path)
	if sigs, _ := trust.DecodeSignatures(twice.Signature); len(sigs) != 2 {
		t.Fatalf("want 2 signatures after signing with a second key, got %d", len(sigs))
	}
}

func TestCerts(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	if code, _, stderr := run(t, "certs", "init", "--dir", dir, "--host", "ctl.example"); code != 0 {
		t.Fatalf("certs init: %s", stderr)
	}
	if code, _, stderr := run(t, "certs", "device", "pos-17", "--dir", dir); code != 0 {
		t.Fatalf("certs device: %s", stderr)
	}
	if code, _, stderr := run(t, "certs", "device", "bad/id", "--dir", dir); code != 1 || !strings.Contains(stderr, "bad/id") {
		t.Fatalf("certs device bad/id: exit %d %s", code, stderr)
	}
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.crt is not PEM")
	}
	for name, usage := range map[string]x509.ExtKeyUsage{"devices/pos-17": x509.ExtKeyUsageClientAuth, "controller": x509.ExtKeyUsageServerAuth} {
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"))
		if err != nil {
			t.Fatal(err)
		}
		leaf, _ := x509.ParseCertificate(pair.Certificate[0])
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Fatalf("%s does not verify against the CA for %v: %v", name, usage, err)
		}
	}
	pair, _ := tls.LoadX509KeyPair(filepath.Join(dir, "devices/pos-17.crt"), filepath.Join(dir, "devices/pos-17.key"))
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	if leaf.Subject.CommonName != "pos-17" {
		t.Fatalf("device certificate CN = %q", leaf.Subject.CommonName)
	}
}
