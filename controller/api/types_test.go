package api

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
)

func TestDeviceJSONOfABareDevice(t *testing.T) {
	d, err := deviceJSON(store.Device{ID: "d", LastSeen: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"id":"d","labels":{},"online":false,"lastSeen":"2026-01-02T03:04:05Z","agentVersion":"","os":"","arch":"","health":"unknown",` +
		`"slots":[],"desired":null,"reportedGeneration":0,"spoolDepth":0,"inferences":0,"inferenceErrors":0,"lastEvents":[]}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
}

func TestDeviceJSONWithCorruptState(t *testing.T) {
	d, err := deviceJSON(store.Device{ID: "d", Health: store.HealthOK, State: []byte{0xff, 0xff}})
	if err == nil {
		t.Fatal("corrupt state decoded")
	}
	if d.ID != "d" || d.Health != "ok" || d.Slots == nil || d.LastSeen != nil {
		t.Fatalf("device = %+v", d)
	}
}
