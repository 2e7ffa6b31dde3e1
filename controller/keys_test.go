package controller

import (
	"crypto/ed25519"
	"encoding/json"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/api"
	"github.com/edgefleet/edgefleet/controller/director"
	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// TestKeyRotationAPI: a viewer reads the keys but cannot rotate; an
// admin rotates the director key, the announcement signed by the old key
// reaches the device retained on its keys topic, desired states are
// signed with the new key, and the rotation is in the audit log. A
// release announcement is pushed as the file `fleet keys rotate-release`
// writes, and a device that says hello later gets the whole chain.
func TestKeyRotationAPI(t *testing.T) {
	dir := t.TempDir()
	h := start(t, dir, nil)
	viewer := h.createToken("alice", "viewer")
	old, err := trust.ReadPrivateKey(filepath.Join(dir, director.KeysDir, director.PrivateKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	oldID := trust.KeyID(old.Public().(ed25519.PublicKey))

	dev := testdevice.Connect(t, h.mqtt, "keys-1")
	keys := dev.Subscribe(wire.KindKeys)
	dev.Send(wire.KindHello, &pb.Hello{AgentVersion: "1"})
	testdevice.Eventually(t, func() (bool, string) {
		resp, b := h.do("GET", "/v1/devices/keys-1", nil, nil)
		return resp.StatusCode == http.StatusOK, string(b)
	})

	var before api.KeyList
	if err := json.Unmarshal([]byte(h.as(viewer, "GET", "/v1/keys", "", http.StatusOK)), &before); err != nil {
		t.Fatal(err)
	}
	if before.DirectorKeyID != oldID || len(before.Announcements) != 0 || !strings.Contains(before.DirectorPublicKey, "PUBLIC KEY") {
		t.Fatalf("keys before rotation: %+v", before)
	}
	if msg := h.as(viewer, "POST", "/v1/keys/director/rotate", "", http.StatusForbidden); !strings.Contains(msg, "needs role admin") {
		t.Fatalf("viewer rotation: %s", msg)
	}
	h.as(h.adminToken(), "POST", "/v1/keys/director/rotate", `{"overlap":"nonsense"}`, http.StatusBadRequest)

	var a api.KeyAnnouncement
	h.call("POST", "/v1/keys/director/rotate", []byte(`{"overlap":"1h"}`), http.StatusOK, &a)
	if a.Role != "director" || a.Sequence != 1 || a.SignedBy != oldID || a.KeyID == oldID || a.RetirePreviousAt == nil {
		t.Fatalf("rotation answered %+v", a)
	}
	chain := dev.Next(keys).GetKeys()
	if len(chain.GetAnnouncements()) != 1 {
		t.Fatalf("device got %d announcements", len(chain.GetAnnouncements()))
	}
	if got, err := trust.VerifyAnnouncement(trust.NewKeySet(old.Public().(ed25519.PublicKey)), chain.GetAnnouncements()[0]); err != nil || got.GetKeyId() != a.KeyID {
		t.Fatalf("announcement does not verify with the old key: %v", err)
	}

	// A release announcement, as `fleet keys rotate-release` writes it.
	_, relOld, _ := trust.GenerateKey()
	relNew, _, _ := trust.GenerateKey()
	signed, err := trust.SignAnnouncement(relOld, trust.NewAnnouncement(pb.KeyRole_KEY_ROLE_RELEASE, relNew, 1, time.Now(), time.Time{}))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := proto.Marshal(signed)
	h.as(h.adminToken(), "POST", "/v1/keys/announcements", "not protobuf \xff", http.StatusBadRequest)
	if msg := h.as(h.adminToken(), "POST", "/v1/keys/announcements", string(body), http.StatusCreated); !strings.Contains(msg, `"release"`) {
		t.Fatalf("push answered %s", msg)
	}
	h.as(h.adminToken(), "POST", "/v1/keys/announcements", string(body), http.StatusConflict) // replayed: out of sequence

	// A device that says hello later gets the whole chain.
	late := testdevice.Connect(t, h.mqtt, "keys-2")
	lateKeys := late.Subscribe(wire.KindKeys)
	late.Send(wire.KindHello, &pb.Hello{AgentVersion: "1"})
	if n := len(late.Next(lateKeys).GetKeys().GetAnnouncements()); n != 2 {
		t.Fatalf("late device got %d announcements", n)
	}

	var audit api.AuditList
	h.call("GET", "/v1/audit?limit=50", nil, http.StatusOK, &audit)
	seen := map[string]api.AuditEntry{}
	for _, e := range audit.Entries {
		if _, ok := seen[e.Who+" "+e.Action+" "+http.StatusText(e.Status)]; !ok {
			seen[e.Who+" "+e.Action+" "+http.StatusText(e.Status)] = e
		}
	}
	for _, want := range []string{
		"admin POST /v1/keys/director/rotate OK",
		"alice POST /v1/keys/director/rotate Forbidden",
		"admin POST /v1/keys/announcements Created",
	} {
		if _, ok := seen[want]; !ok {
			t.Errorf("audit log lacks %q: %+v", want, audit.Entries)
		}
	}
	if e := seen["admin POST /v1/keys/director/rotate OK"]; !strings.Contains(e.Target, a.KeyID) {
		t.Errorf("rotation audited with target %q", e.Target)
	}
}
