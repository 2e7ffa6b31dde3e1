package cli

import (
	"crypto/ed25519"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

// TestRotateReleaseAndPush: `fleet keys rotate-release` signs the
// announcement of the new key with the old one, offline with --sequence or
// with the next sequence from GET /v1/keys, and `fleet keys push` uploads
// the file as it is. The controller is faked at the HTTP edge.
func TestRotateReleaseAndPush(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"old", "new"} {
		if code, _, stderr := run(t, "keys", "init", "--dir", filepath.Join(dir, d)); code != 0 {
			t.Fatalf("keys init: %s", stderr)
		}
	}
	oldPub, err := trust.ReadPublicKey(filepath.Join(dir, "old", "release.pub"))
	if err != nil {
		t.Fatal(err)
	}
	newPub, _ := trust.ReadPublicKey(filepath.Join(dir, "new", "release.pub"))

	var pushed []byte
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch r.Method + " " + r.URL.Path {
		case "GET /v1/keys":
			json.NewEncoder(w).Encode(map[string]any{"directorKeyId": "d", "announcements": []map[string]any{
				{"role": "release", "sequence": 4, "keyId": "a"}, {"role": "director", "sequence": 9, "keyId": "b"}}})
		case "POST /v1/keys/announcements":
			pushed, _ = io.ReadAll(r.Body)
			w.WriteHeader(http.StatusCreated)
			json.NewEncoder(w).Encode(map[string]any{"role": "release", "sequence": 5, "keyId": trust.KeyID(newPub), "signedBy": trust.KeyID(oldPub), "issuedAt": time.Now()})
		default:
			http.NotFound(w, r)
		}
	}))
	defer api.Close()
	t.Setenv("EDGEFLEET_CONTROLLER", api.URL)
	t.Setenv("EDGEFLEET_TOKEN", "eft_admin")

	read := func(path string) *pb.KeyAnnouncement {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var s pb.SignedKeyAnnouncement
		if err := proto.Unmarshal(b, &s); err != nil {
			t.Fatal(err)
		}
		a, err := trust.VerifyAnnouncement(trust.NewKeySet(oldPub), &s)
		if err != nil {
			t.Fatalf("announcement does not verify with the old key: %v", err)
		}
		return a
	}
	oldKey, newKey := filepath.Join(dir, "old", "release.key"), filepath.Join(dir, "new", "release.pub")

	offline := filepath.Join(dir, "offline.pb")
	if code, _, stderr := run(t, "keys", "rotate-release", "--old-key", oldKey, "--new-key", newKey, "--sequence", "3", "--controller", "http://127.0.0.1:1", "--out", offline); code != 0 {
		t.Fatalf("offline rotate-release: %s", stderr)
	}
	a := read(offline)
	if a.GetRole() != pb.KeyRole_KEY_ROLE_RELEASE || a.GetSequence() != 3 || a.GetKeyId() != trust.KeyID(newPub) ||
		time.Until(time.UnixMilli(a.GetRetirePreviousAtUnixMs())) < DefaultReleaseOverlap-time.Hour {
		t.Fatalf("offline announcement %v", a)
	}

	asked := filepath.Join(dir, "asked.pb")
	if code, stdout, stderr := run(t, "keys", "rotate-release", "--old-key", oldKey, "--new-key", filepath.Join(dir, "new", "release.key"), "--overlap", "0s", "--out", asked); code != 0 || !strings.Contains(stdout, "sequence 5") {
		t.Fatalf("rotate-release: exit %d %s %s", code, stdout, stderr)
	}
	if a := read(asked); a.GetSequence() != 5 || a.GetRetirePreviousAtUnixMs() != 0 || !ed25519.PublicKey(a.GetPublicKey()).Equal(newPub) {
		t.Fatalf("announcement %v", a)
	}
	// Never overwrites a file.
	if code, _, _ := run(t, "keys", "rotate-release", "--old-key", oldKey, "--new-key", newKey, "--sequence", "3", "--out", offline); code == 0 {
		t.Fatal("an announcement file was overwritten")
	}
	if code, _, stderr := run(t, "keys", "rotate-release", "--old-key", oldKey, "--new-key", filepath.Join(dir, "old", "release.pub"), "--sequence", "3"); code != 2 || !strings.Contains(stderr, "same key") {
		t.Fatalf("same key: exit %d %s", code, stderr)
	}

	if code, stdout, stderr := run(t, "keys", "push", asked); code != 0 || !strings.Contains(stdout, trust.KeyID(newPub)) {
		t.Fatalf("push: exit %d %s %s", code, stdout, stderr)
	}
	if want, _ := os.ReadFile(asked); string(pushed) != string(want) {
		t.Fatal("push did not upload the file as it is")
	}
}
