package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/controller/access"
	"github.com/edgefleet/edgefleet/controller/registry"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
)

// TestReleaseEndpoints: an operator pushes a signed release (audited), a
// viewer may list but not push, and agents fetch the signed document
// without a token.
func TestReleaseEndpoints(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg, err := registry.New(dir, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range []struct{ name, role string }{{"ops", "operator"}, {"ro", "viewer"}} {
		if _, err := st.CreateToken(ctx, store.Token{Name: tok.name, Role: tok.role, Hash: access.Hash("secret-" + tok.name)}); err != nil {
			t.Fatal(err)
		}
	}
	srv := httptest.NewServer(New(Options{Registry: reg, Releases: reg, Tokens: st, Audit: st}))
	defer srv.Close()

	_, priv, _ := trust.GenerateKey()
	bin := []byte("the agent binary")
	sum := sha256.Sum256(bin)
	d, err := release.Sign(priv, release.Manifest{Version: "1.2.0", OS: "linux", Arch: "arm64", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(bin))})
	if err != nil {
		t.Fatal(err)
	}
	doc, _ := d.Encode()

	push := func(token string, doc, bin []byte) *http.Response {
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		w, _ := mw.CreateFormField("release")
		w.Write(doc)
		w, _ = mw.CreateFormFile("binary", "fleet-agent")
		w.Write(bin)
		mw.Close()
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/agent/releases", &body)
		req.Header.Set("Content-Type", mw.FormDataContentType())
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	cases := []struct {
		name   string
		token  string
		bin    []byte
		status int
	}{
		{"viewer may not push", "secret-ro", bin, http.StatusForbidden},
		{"binary not the signed one", "secret-ops", []byte("something else...."), http.StatusBadRequest},
		{"operator pushes", "secret-ops", bin, http.StatusCreated},
		{"again", "secret-ops", bin, http.StatusOK},
	}
	for _, c := range cases {
		if resp := push(c.token, doc, c.bin); resp.StatusCode != c.status {
			t.Fatalf("%s: status %d, want %d", c.name, resp.StatusCode, c.status)
		}
	}

	get := func(path, token string) (int, []byte) {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	code, b := get("/v1/agent/releases", "secret-ro")
	var list struct {
		Releases []struct{ Version, Arch, SHA256 string }
	}
	if code != http.StatusOK || json.Unmarshal(b, &list) != nil || len(list.Releases) != 1 || list.Releases[0].Arch != "arm64" || list.Releases[0].Version != "1.2.0" {
		t.Fatalf("list: %d %s", code, b)
	}
	if code, b := get(release.DocumentPath("1.2.0", "linux", "arm64"), ""); code != http.StatusOK || !bytes.Equal(b, doc) {
		t.Fatalf("document without a token: %d %s", code, b)
	}
	if code, b := get(release.DocumentPath("1.2.0", "linux", "amd64"), ""); code != http.StatusNotFound || !strings.Contains(string(b), "fleet agent release push") {
		t.Fatalf("missing platform: %d %s", code, b)
	}
	if code, b := get("/v1/artifacts/"+hex.EncodeToString(sum[:]), ""); code != http.StatusOK || !bytes.Equal(b, bin) {
		t.Fatalf("binary: %d %q", code, b)
	}
	entries, err := st.Audit(ctx, store.AuditQuery{Who: "ops"})
	if err != nil || len(entries) != 3 || !strings.Contains(entries[0].Target, "agent release 1.2.0 linux/arm64") {
		t.Fatalf("audit: %+v, %v", entries, err)
	}
}
