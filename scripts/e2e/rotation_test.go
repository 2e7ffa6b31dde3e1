package e2e

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// signedFleet starts a controller and gives agents the release key made by
// `fleet keys init` and a copy of the controller's director.pub taken now:
// the copy, not the controller's file, which a rotation rewrites, so an
// agent restarted later trusts a rotated key only if it learnt it.
func signedFleet(t *testing.T) (f *fleet, releaseKey string) {
	t.Helper()
	f = startController(t, "")
	keys := filepath.Join(f.dir, "keys")
	f.fleetCLI("keys", "init", "--dir", keys)
	pem, err := os.ReadFile(filepath.Join(f.dir, "controller", "keys", "director.pub"))
	if err != nil {
		t.Fatalf("the controller wrote no director key: %v", err)
	}
	directorPub := filepath.Join(f.dir, "director-at-enrolment.pub")
	if err := os.WriteFile(directorPub, pem, 0o644); err != nil {
		t.Fatal(err)
	}
	f.agentFlags = func(string) []string {
		return []string{"--release-key", filepath.Join(keys, "release.pub"), "--director-key", directorPub}
	}
	return f, filepath.Join(keys, "release.key")
}

// pushSigned builds the example model at version, signs it with key and
// pushes it with the real fleet CLI.
func (f *fleet) pushSigned(key, version string) {
	f.t.Helper()
	path := filepath.Join(f.dir, "grid-anomaly-"+version+".bundle")
	if err := os.WriteFile(path, modeltest.BuildExample(f.t, "grid-anomaly", version), 0o644); err != nil {
		f.t.Fatal(err)
	}
	f.fleetCLI("model", "sign", "--key", key, path)
	f.fleetCLI("model", "push", path)
}

// agentMetrics returns the agent's /metrics text.
func (f *fleet) agentMetrics(id string) string {
	resp, err := http.Get("http://" + f.listens[id] + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func trustedKeyLine(role, id string) string {
	return `edgefleet_agent_trusted_key{role="` + role + `",key="` + id + `"} 1`
}

// TestDirectorKeyRotation rotates the director key while two agents run:
// they learn the new key from the announcement signed by the old one and
// install what the new key signs; one of them refuses a desired state
// signed by a key nobody announced and an announcement signed by such a
// key, and after a restart with its original flags still trusts the new
// key and no longer the old one.
func TestDirectorKeyRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f, releaseKey := signedFleet(t)
	const id, other = "e2e-rotate-1", "e2e-rotate-2"
	f.startAgent(id, "trust=rotate")
	f.startAgent(other, "trust=rotate")
	f.pushSigned(releaseKey, "1.0.0")
	f.pushSigned(releaseKey, "1.1.0")
	ctx := context.Background()
	assign := func(version string) {
		t.Helper()
		if _, err := f.client.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: version, Selector: "trust=rotate"}); err != nil {
			t.Fatal(err)
		}
	}
	assign("1.0.0")
	f.waitActive("1.0.0", id, other)

	before, err := f.client.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	oldID := before.DirectorKeyID
	// Retired at once: the strictest case for the agent.
	out := f.fleetCLI("keys", "rotate-director", "--overlap", "0s")
	after, err := f.client.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	newID := after.DirectorKeyID
	if newID == oldID || len(after.Announcements) != 1 || after.Announcements[0].SignedBy != oldID || !strings.Contains(out, newID) {
		t.Fatalf("rotation: %s -> %s, announcements %+v, CLI said %q", oldID, newID, after.Announcements, out)
	}
	for _, a := range []string{id, other} {
		f.eventually(a+" trusts the new director key and not the old one", 30*time.Second, func() (bool, string) {
			m := f.agentMetrics(a)
			return strings.Contains(m, trustedKeyLine("director", newID)) && !strings.Contains(m, trustedKeyLine("director", oldID)), m
		})
	}

	// What the new key signs is installed.
	assign("1.1.0")
	f.waitActive("1.1.0", id, other)

	// A desired state signed by a key nobody announced, published like
	// a broker under an attacker's control would: refused.
	_, stranger, _ := trust.GenerateKey()
	spy := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(f.broker).SetClientID("e2e-rotation-spy").SetConnectTimeout(5 * time.Second))
	if tok := spy.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", f.broker, tok.Error())
	}
	defer spy.Disconnect(250)
	publish := func(kind wire.Kind, body proto.Message) {
		t.Helper()
		payload, err := wire.Seal(id, time.Now(), body)
		if err != nil {
			t.Fatal(err)
		}
		if tok := spy.Publish(wire.Topic(id, kind), 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", kind, tok.Error())
		}
	}
	raw, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&pb.DesiredState{DeviceId: id, Generation: 1000,
		IssuedAtUnixMs: time.Now().UnixMilli(), ExpiresAtUnixMs: time.Now().Add(time.Hour).UnixMilli()})
	sig := trust.Sign(stranger, trust.DomainDesiredState, raw)
	publish(wire.KindDesired, &pb.SignedDesiredState{Desired: raw, Signature: sig.Sig, KeyId: sig.KeyID})
	f.waitEvent(id, "refused", "unknown key", 1)

	// An announcement of the stranger's key, signed by itself: refused,
	// and the trusted keys do not change.
	forged, err := trust.SignAnnouncement(stranger, trust.NewAnnouncement(pb.KeyRole_KEY_ROLE_DIRECTOR, stranger.Public().(ed25519.PublicKey), 9, time.Now(), time.Time{}))
	if err != nil {
		t.Fatal(err)
	}
	publish(wire.KindKeys, &pb.KeyAnnouncements{Announcements: []*pb.SignedKeyAnnouncement{forged}})
	f.waitEvent(id, "refused", "key announcement refused", 1)
	if m := f.agentMetrics(id); strings.Contains(m, trustedKeyLine("director", trust.KeyID(stranger.Public().(ed25519.PublicKey)))) {
		t.Fatalf("the forged key is trusted:\n%s", m)
	}
	if got := f.infer(id, 1); got != "1.1.0" {
		t.Fatalf("%s answers after the forgeries", got)
	}

	// Restarted with the flags it was enrolled with (the old director
	// key only): it still trusts the new key, from DATA/trust.json.
	if err := f.agents[id].Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	f.startAgent(id, "trust=rotate")
	m := f.agentMetrics(id)
	if !strings.Contains(m, trustedKeyLine("director", newID)) || strings.Contains(m, trustedKeyLine("director", oldID)) {
		t.Fatalf("after restart the agent trusts:\n%s", m)
	}
	// A new state signed by the new key is accepted after the restart.
	d, err := f.client.Device(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	assign("1.1.0")
	f.eventually("a new generation accepted after the restart", 30*time.Second, func() (bool, string) {
		now, err := f.client.Device(ctx, id)
		if err != nil {
			return false, err.Error()
		}
		return now.ReportedGeneration > d.ReportedGeneration, fmt.Sprintf("reported generation %d, was %d", now.ReportedGeneration, d.ReportedGeneration)
	})
	if got := f.infer(id, 1); got != "1.1.0" {
		t.Fatalf("%s answers after the restart", got)
	}
}
