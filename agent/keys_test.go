package agent

import (
	"crypto/ed25519"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// TestKeyAnnouncementReoffersDesired: a desired state signed by the next
// director key, arriving before the key's announcement, is refused; once
// the announcement (signed by the configured key) arrives on the keys
// topic, the agent trusts the new key, saves it, shows it in /metrics and
// accepts the state it refused, without the controller sending it again.
func TestKeyAnnouncementReoffersDesired(t *testing.T) {
	broker := brokertest.Start(t)
	ctl := broker.Controller(t)
	srv := httptest.NewServer(&bundles{})
	defer srv.Close()
	dir := t.TempDir()
	writeKey := func(name string, pub ed25519.PublicKey) string {
		pem, err := trust.MarshalPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	relPub, _, _ := trust.GenerateKey()
	oldPub, oldKey, _ := trust.GenerateKey()
	newPub, newKey, _ := trust.GenerateKey()

	cfg := DefaultConfig()
	cfg.ID, cfg.Data, cfg.Broker, cfg.Controller = dev, filepath.Join(dir, "data"), broker.URL(), srv.URL
	cfg.ReleaseKeys = []string{writeKey("release.pub", relPub)}
	cfg.DirectorKeys = []string{writeKey("director.pub", oldPub)}
	a := startAgent(t, cfg, modeltest.NewHost(t, host.Options{}), spool.NewMemory(0))
	defer a.stop()
	ctl.WaitFor(10*time.Second, "hello", brokertest.Kind(dev, wire.KindHello))

	raw, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&pb.DesiredState{DeviceId: dev, Generation: 7, IssuedAtUnixMs: time.Now().UnixMilli()})
	sig := trust.Sign(newKey, trust.DomainDesiredState, raw)
	ctl.Send(dev, wire.KindDesired, &pb.SignedDesiredState{Desired: raw, Signature: sig.Sig, KeyId: sig.KeyID})
	if e := ctl.WaitFor(10*time.Second, "refused", event(pb.EventKind_EVENT_KIND_REFUSED, 0)).Env.GetEvent(); !strings.Contains(e.GetDetail(), "unknown key") {
		t.Fatalf("REFUSED detail %q", e.GetDetail())
	}

	ann, err := trust.SignAnnouncement(oldKey, trust.NewAnnouncement(pb.KeyRole_KEY_ROLE_DIRECTOR, newPub, 1, time.Now(), time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	ctl.Send(dev, wire.KindKeys, &pb.KeyAnnouncements{Announcements: []*pb.SignedKeyAnnouncement{ann}})
	ctl.WaitFor(10*time.Second, "generation 7 accepted", state(func(s *pb.ReportedState) bool { return s.GetDesiredGeneration() == 7 }))

	if _, err := os.Stat(filepath.Join(cfg.Data, "trust.json")); err != nil {
		t.Fatalf("trust.json: %v", err)
	}
	_, metrics := get(t, "http://"+a.addr+"/metrics")
	for _, want := range []string{
		`edgefleet_agent_trusted_key{role="director",key="` + trust.KeyID(newPub) + `"} 1`,
		`edgefleet_agent_trusted_key{role="director",key="` + trust.KeyID(oldPub) + `"} 1`,
		"edgefleet_agent_key_announcements_applied_total 1",
		"edgefleet_agent_mqtt_oversized_total 0",
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
