package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// TestSignedFleet runs agents that trust only the release key made by
// `fleet keys init` and the controller's director key: a bundle signed
// with `fleet model sign` is installed, an unsigned one is refused while
// the old model keeps answering, and a desired state captured from the
// broker and republished after a newer one is refused as a replay, also
// after the agent restarts.
func TestSignedFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startController(t, "")
	keys := filepath.Join(f.dir, "keys")
	f.fleetCLI("keys", "init", "--dir", keys)
	directorPub := filepath.Join(f.dir, "controller", "keys", "director.pub")
	if _, err := os.Stat(directorPub); err != nil {
		t.Fatalf("the controller wrote no director key: %v", err)
	}
	f.agentFlags = func(string) []string {
		return []string{"--release-key", filepath.Join(keys, "release.pub"), "--director-key", directorPub}
	}
	const id = "e2e-signed-1"
	f.startAgent(id, "trust=signed")

	signed := filepath.Join(f.dir, "grid-anomaly-1.0.0.bundle")
	if err := os.WriteFile(signed, modeltest.BuildExample(t, "grid-anomaly", "1.0.0"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := f.fleetCLI("model", "sign", "--key", filepath.Join(keys, "release.key"), signed); !strings.Contains(out, "signed grid-anomaly@1.0.0") {
		t.Fatalf("fleet model sign printed %q", out)
	}
	f.fleetCLI("model", "push", signed)
	f.pushExample("1.1.0") // unsigned

	// Capture the retained desired state of the first assignment.
	var mu sync.Mutex
	var captured []byte
	spy := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(f.broker).SetClientID("e2e-spy").SetConnectTimeout(5 * time.Second))
	if tok := spy.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", f.broker, tok.Error())
	}
	defer spy.Disconnect(250)
	topic := wire.Topic(id, wire.KindDesired)
	if tok := spy.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) {
		mu.Lock()
		if captured == nil {
			captured = append([]byte(nil), m.Payload()...)
		}
		mu.Unlock()
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	ctx := context.Background()
	if _, err := f.client.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "trust=signed"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", id)
	f.eventually("desired state captured", 10*time.Second, func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return captured != nil, ""
	})

	// The unsigned bundle is refused; 1.0.0 keeps answering.
	if _, err := f.client.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: "1.1.0", Selector: "trust=signed"}); err != nil {
		t.Fatal(err)
	}
	f.waitEvent(id, "failed", "not signed", 1)
	if got := f.infer(id, 1); got != "1.0.0" {
		t.Fatalf("%s answered after an unsigned bundle was assigned", got)
	}

	// The captured state, republished retained, is a replay: refused
	// before and after the agent restarts.
	replay := func() {
		if tok := spy.Publish(topic, 1, true, captured); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("republish: %v", tok.Error())
		}
	}
	replay()
	f.waitEvent(id, "refused", "replay", 1)
	if err := f.agents[id].Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	f.startAgent(id, "trust=signed")
	// The broker hands the restarted agent the replayed (retained) state
	// at once; it is refused again.
	replay()
	f.waitEvent(id, "refused", "replay", 2)
	if got := f.infer(id, 1); got != "1.0.0" {
		t.Fatalf("%s answered after the replay", got)
	}
}

// waitEvent waits until device id reported n events of kind whose detail
// contains detail.
func (f *fleet) waitEvent(id, kind, detail string, n int) {
	f.t.Helper()
	f.eventually(id+" reports "+kind+" "+detail, 60*time.Second, func() (bool, string) {
		d, err := f.client.Device(context.Background(), id)
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		found := 0
		for _, e := range d.LastEvents {
			if strings.EqualFold(e.Kind, kind) && strings.Contains(e.Detail, detail) {
				found++
			}
			seen = append(seen, e.Kind+": "+e.Detail)
		}
		return found >= n, strings.Join(seen, "\n")
	})
}
