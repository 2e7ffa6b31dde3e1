package access

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/controller/store"
)

func TestRequired(t *testing.T) {
	tests := []struct {
		method, path string
		want         Role
	}{
		{"GET", "/healthz", None},
		{"GET", "/metrics", None},
		{"GET", "/v1/artifacts/abc", None},
		{"HEAD", "/v1/artifacts/abc", None},
		{"GET", "/v1/devices", Viewer},
		{"GET", "/v1/devices/dev-1", Viewer},
		{"GET", "/v1/models", Viewer},
		{"GET", "/v1/rollouts", Viewer},
		{"GET", "/v1/audit", Viewer},
		{"POST", "/v1/models", Operator},
		{"POST", "/v1/assignments", Operator},
		{"POST", "/v1/rollouts", Operator},
		{"POST", "/v1/rollouts/r1/pause", Operator},
		{"DELETE", "/v1/rollouts/r1", Operator},
		{"PUT", "/v1/artifacts/abc", Operator},
		{"POST", "/healthz", Operator},
		{"OPTIONS", "/v1/devices", Operator},
		{"GET", "/v1/tokens", Admin},
		{"POST", "/v1/tokens", Admin},
		{"DELETE", "/v1/tokens/ci", Admin},
		{"POST", "/v1/keys/rotate", Admin},
		{"GET", "/v1/keys", Viewer},
		{"POST", "/v1/keys/director/rotate", Admin},
		{"POST", "/v1/keys/announcements", Admin},
		// Unclean paths are judged as the router will see them.
		{"POST", "/v1//tokens", Admin},
		{"POST", "/v1/models/../tokens", Admin},
		{"GET", "/v1/artifacts/../tokens", Admin},
		{"GET", "/v1/tokensmith", Viewer},
	}
	for _, tt := range tests {
		if got := Required(tt.method, tt.path); got != tt.want {
			t.Errorf("Required(%s %s) = %s, want %s", tt.method, tt.path, got, tt.want)
		}
	}
}

func TestRoles(t *testing.T) {
	for _, r := range []Role{Viewer, Operator, Admin} {
		got, err := ParseRole(r.String())
		if err != nil || got != r {
			t.Errorf("ParseRole(%q) = %v, %v", r.String(), got, err)
		}
	}
	for _, s := range []string{"", "none", "root", "Admin"} {
		if _, err := ParseRole(s); err == nil || !strings.Contains(err.Error(), "viewer, operator or admin") {
			t.Errorf("ParseRole(%q) = %v", s, err)
		}
	}
	if !(Viewer < Operator && Operator < Admin) {
		t.Fatal("roles are not ordered")
	}
}

func TestNewTokenAndHash(t *testing.T) {
	a, err := NewToken()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewToken()
	if a == b || !strings.HasPrefix(a, TokenPrefix) || len(a) != len(TokenPrefix)+43 {
		t.Fatalf("tokens %q, %q", a, b)
	}
	if Hash(a) == Hash(b) || len(Hash(a)) != 64 || Hash(a) != Hash(a) {
		t.Fatal("Hash is not a stable SHA-256")
	}
}

func TestBearerToken(t *testing.T) {
	for h, want := range map[string]string{
		"":                                    "",
		"Bearer eft_x":                        "eft_x",
		"bearer  eft_x ":                      "eft_x",
		"Basic dXNlcjpwYXNz":                  "",
		"Bearer " + strings.Repeat("a", 1000): strings.Repeat("a", MaxTokenLen),
	} {
		r, _ := http.NewRequest("GET", "/", nil)
		if h != "" {
			r.Header.Set("Authorization", h)
		}
		if got := BearerToken(r); got != want {
			t.Errorf("BearerToken(%.30q) = %.30q, want %.30q", h, got, want)
		}
	}
}

func TestValidateName(t *testing.T) {
	for name, ok := range map[string]bool{"ci": true, "alice.ops-1": true, "": false, "-x": false, "a b": false, strings.Repeat("a", 65): false} {
		if err := ValidateName(name); (err == nil) != ok {
			t.Errorf("ValidateName(%q) = %v", name, err)
		}
	}
}

func TestBootstrap(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(context.Background(), filepath.Join(dir, store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	p, created, err := Bootstrap(ctx, st, dir)
	if err != nil || !created || p != filepath.Join(dir, AdminTokenFile) {
		t.Fatalf("Bootstrap = %q, %v, %v", p, created, err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin.token: %v, mode %v; want 0600", err, fi.Mode())
	}
	raw, _ := os.ReadFile(p)
	secret := strings.TrimSpace(string(raw))
	tok, err := st.TokenByHash(ctx, Hash(secret))
	if err != nil || tok.Name != BootstrapName || tok.Role != "admin" {
		t.Fatalf("the file's token: %+v, %v", tok, err)
	}
	// A second start neither makes another token nor touches the file,
	// even when the file was removed.
	os.Remove(p)
	if _, created, err := Bootstrap(ctx, st, dir); err != nil || created {
		t.Fatalf("second Bootstrap: created=%v, %v", created, err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("second Bootstrap recreated admin.token: %v", err)
	}
	if n, _ := st.CountTokens(ctx); n != 1 {
		t.Fatalf("%d tokens after two starts", n)
	}
}

// FuzzRequired checks the policy's invariants on any method and path: only
// reads can be public, nothing under /v1/tokens is below admin, and no
// change under /v1/keys is below admin (reading public keys needs a viewer).
func FuzzRequired(f *testing.F) {
	for _, p := range []string{"/v1/tokens", "/v1//tokens/x", "/v1/artifacts/../tokens", "/healthz", "/v1/devices", "", "//", "/v1/keys/../keys"} {
		f.Add("GET", p)
		f.Add("POST", p)
	}
	f.Fuzz(func(t *testing.T, method, p string) {
		got := Required(method, p)
		if got == None && method != http.MethodGet && method != http.MethodHead {
			t.Fatalf("Required(%q, %q) = none for a method that may change something", method, p)
		}
		clean := path.Clean("/" + p)
		read := method == http.MethodGet || method == http.MethodHead
		if (under(clean, "/v1/tokens") || (under(clean, "/v1/keys") && !read)) && got != Admin {
			t.Fatalf("Required(%q, %q) = %s under an admin-only prefix", method, p, got)
		}
		if under(clean, "/v1/keys") && read && got != Viewer {
			t.Fatalf("Required(%q, %q) = %s, want viewer", method, p, got)
		}
	})
}

// FuzzBearerToken checks the header parser never returns more than the cap.
func FuzzBearerToken(f *testing.F) {
	for _, h := range []string{"Bearer eft_x", "bearer", "Bearer ", "Basic x", " Bearer x"} {
		f.Add(h)
	}
	f.Fuzz(func(t *testing.T, h string) {
		r, _ := http.NewRequest("GET", "/", nil)
		r.Header["Authorization"] = []string{h}
		if tok := BearerToken(r); len(tok) > MaxTokenLen {
			t.Fatalf("token of %d bytes", len(tok))
		}
	})
}
