package store

import (
	"fmt"
	"testing"
	"time"
)

// TestWithoutHello: a device counts as having said hello once a hello
// stored its platform; a state (even one naming the agent version), a
// presence or an event does not, and a device with no row has none.
func TestWithoutHello(t *testing.T) {
	s := newStore(t)
	ctx := t.Context()
	at := time.Now()
	online := true
	_, err := s.ApplyDeviceUpdates(ctx, []DeviceUpdate{
		{ID: "greeted", At: at, Hello: &Hello{ID: "greeted", OS: "linux", Arch: "arm64", AgentVersion: "1", At: at}},
		{ID: "greeted", At: at, Report: &Report{Health: HealthOK}},
		{ID: "stateful", At: at, Report: &Report{Health: HealthOK, AgentVersion: "1"}},
		{ID: "present", At: at, Online: &online},
		{ID: "eventful", At: at, Event: &Event{DeviceID: "eventful", Kind: "healthy", At: at}},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.WithoutHello(ctx, []string{"greeted", "stateful", "present", "eventful", "unknown"})
	if err != nil {
		t.Fatal(err)
	}
	if want := "[stateful present eventful unknown]"; fmt.Sprint(got) != want {
		t.Fatalf("without hello: %v, want %s", got, want)
	}
	if got, err := s.WithoutHello(ctx, nil); err != nil || len(got) != 0 {
		t.Fatalf("no ids: %v, %v", got, err)
	}
}
