package main

import (
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

func TestWaveLine(t *testing.T) {
	w := client.RolloutWave{Index: 1, Size: 3, State: "running",
		Steps: map[string]int{"healthy": 1, "activated": 1, "downloading": 1},
		Gates: []client.GateVerdict{{Gate: "errorRate", Result: "pass", Detail: "error rate 0.00%"}}}
	want := "wave 2 running, 1/3 done: downloading 1 activated 1 healthy 1; gate errorRate PASS (error rate 0.00%)"
	if got := waveLine(w); got != want {
		t.Fatalf("waveLine\n got %q\nwant %q", got, want)
	}
}

// TestProgressKey: the demo redraws when steps, waves, gates or the phase
// change, not when only a timestamp does.
func TestProgressKey(t *testing.T) {
	base := func() *client.Rollout {
		return &client.Rollout{Phase: "running", Waves: []client.RolloutWave{
			{State: "running", Steps: map[string]int{"notified": 1}},
			{State: "pending", Steps: map[string]int{"pending": 2}},
		}}
	}
	k := progressKey(base())
	same := base()
	same.UpdatedAt = time.Now()
	if progressKey(same) != k {
		t.Fatal("a new timestamp changed the key")
	}
	for name, change := range map[string]func(r *client.Rollout){
		"step":  func(r *client.Rollout) { r.Waves[0].Steps = map[string]int{"downloading": 1} },
		"wave":  func(r *client.Rollout) { r.Wave = 1 },
		"phase": func(r *client.Rollout) { r.Phase = "paused" },
		"gate":  func(r *client.Rollout) { r.Waves[0].Gates = []client.GateVerdict{{Gate: "errorRate", Result: "fail"}} },
	} {
		r := base()
		change(r)
		if progressKey(r) == k {
			t.Errorf("a %s change left the key as it was", name)
		}
	}
}
