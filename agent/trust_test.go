package agent

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/proto/trust"
)

func writePub(t *testing.T, dir, name string) (string, string) {
	t.Helper()
	pub, _, err := trust.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	pem, err := trust.MarshalPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, trust.KeyID(pub)
}

func TestConfigKeys(t *testing.T) {
	file := writeFile(t, "id: pos-17\nrelease_keys: [/file/r.pub]\ndirector_keys: [/file/d.pub]\n")
	cases := []struct {
		name          string
		args          []string
		env           map[string]string
		release, dir  string
		allowUnsigned bool
	}{
		{"file", nil, nil, "/file/r.pub", "/file/d.pub", false},
		{"env beats file", nil, map[string]string{"EDGEFLEET_RELEASE_KEYS": "/env/a.pub,/env/b.pub", "EDGEFLEET_ALLOW_UNSIGNED": "1"}, "/env/a.pub,/env/b.pub", "/file/d.pub", true},
		{"flags beat env and repeat", []string{"--release-key", "/f/1.pub", "--release-key", "/f/2.pub", "--director-key", "/f/d.pub", "--allow-unsigned=false"},
			map[string]string{"EDGEFLEET_RELEASE_KEYS": "/env/a.pub", "EDGEFLEET_ALLOW_UNSIGNED": "1"}, "/f/1.pub,/f/2.pub", "/f/d.pub", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := LoadConfig(append([]string{"--config", file}, c.args...), env(c.env), &bytes.Buffer{})
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(cfg.ReleaseKeys, ","); got != c.release {
				t.Errorf("release keys %q, want %q", got, c.release)
			}
			if got := strings.Join(cfg.DirectorKeys, ","); got != c.dir {
				t.Errorf("director keys %q, want %q", got, c.dir)
			}
			if cfg.AllowUnsigned != c.allowUnsigned {
				t.Errorf("allow unsigned %v", cfg.AllowUnsigned)
			}
		})
	}
	if _, err := LoadConfig([]string{"--id", "x", "--release-key", " "}, env(nil), &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "release_keys") {
		t.Fatalf("empty key file name: %v", err)
	}
}

func TestGuardFor(t *testing.T) {
	dir := t.TempDir()
	rel, relID := writePub(t, dir, "release.pub")
	dirKey, dirID := writePub(t, dir, "director.pub")
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	// Without both keys the agent does not start, unless told to.
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no keys", Config{Data: dir}, "no release key and no director key"},
		{"no director key", Config{Data: dir, ReleaseKeys: []string{rel}}, "no director key configured"},
		{"no release key", Config{Data: dir, DirectorKeys: []string{dirKey}}, "no release key configured"},
	} {
		g, err := guardFor(c.cfg, log)
		if g != nil || !errors.Is(err, ErrNoKeys) || !strings.Contains(err.Error(), c.want) ||
			!strings.Contains(err.Error(), "--release-key") || !strings.Contains(err.Error(), "--director-key") || !strings.Contains(err.Error(), "--allow-unsigned") {
			t.Errorf("%s: %T, %v", c.name, g, err)
		}
	}
	g, err := guardFor(Config{Data: dir, AllowUnsigned: true}, log)
	if _, ok := g.(deploy.AllowAll); err != nil || !ok || !strings.Contains(logs.String(), "NO RELEASE OR DIRECTOR KEY") {
		t.Fatalf("no keys, --allow-unsigned: %T, %v, logs %s", g, err, logs.String())
	}
	if g, err := guardFor(Config{Data: dir, AllowUnsigned: true, ReleaseKeys: []string{rel}}, log); err != nil || g.(*deploy.TrustGuard).Director != nil {
		t.Fatalf("release key only, --allow-unsigned: %T, %v", g, err)
	}

	g, err = guardFor(Config{Data: dir, ReleaseKeys: []string{rel}, DirectorKeys: []string{dirKey}}, log)
	if err != nil {
		t.Fatal(err)
	}
	tg, ok := g.(*deploy.TrustGuard)
	if !ok || strings.Join(tg.Release.IDs(), ",") != relID || strings.Join(tg.Director.IDs(), ",") != dirID || tg.DataDir != dir {
		t.Fatalf("guard %#v", g)
	}

	if _, err := guardFor(Config{Data: dir, ReleaseKeys: []string{rel}, DirectorKeys: []string{filepath.Join(dir, "missing.pub")}}, log); err == nil ||
		!strings.Contains(err.Error(), "director_keys") || !strings.Contains(err.Error(), "missing.pub") {
		t.Fatalf("missing key file: %v", err)
	}
	// A private key given as a public key is refused.
	_, priv, _ := trust.GenerateKey()
	pem, _ := trust.MarshalPrivateKey(priv)
	privPath := filepath.Join(dir, "release.key")
	if err := os.WriteFile(privPath, pem, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := guardFor(Config{Data: dir, ReleaseKeys: []string{privPath}, DirectorKeys: []string{dirKey}}, log); err == nil || !strings.Contains(err.Error(), "PUBLIC KEY") {
		t.Fatalf("private key as release key: %v", err)
	}
}
