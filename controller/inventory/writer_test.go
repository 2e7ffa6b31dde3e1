package inventory

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func openStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// TestWriterActsOnlyOnStoredMessages: every follow-up (Done) runs after its
// message is committed (another connection reads it), in arrival order,
// and messages queued when the writer stops are still stored.
func TestWriterActsOnlyOnStoredMessages(t *testing.T) {
	st := openStore(t)
	inv := New(st, nil, nil, WithQueue(4096, 64))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inv.Run(ctx) }()

	const devices, rounds = 8, 5
	var mu sync.Mutex
	var order []string
	var problems []string
	n := 0
	at := time.Now()
	submit := func(u Update, check func(store.Device) error) {
		t.Helper()
		n++
		label := fmt.Sprintf("%s (message %d)", u.DeviceID, n)
		u.Done = func(err error) {
			mu.Lock()
			defer mu.Unlock()
			order = append(order, u.DeviceID)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", label, err))
				return
			}
			d, err := st.Device(context.Background(), u.DeviceID)
			if err == nil {
				err = check(d)
			}
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s acted on before it was stored: %v", label, err))
			}
		}
		if err := inv.Submit(ctx, u); err != nil {
			t.Fatal(err)
		}
	}
	var want []string
	for r := range rounds {
		for d := range devices {
			id := fmt.Sprintf("dev-%02d", d)
			if r == 0 {
				submit(Update{DeviceID: id, At: at, Hello: &pb.Hello{AgentVersion: "1.0.0", Labels: map[string]string{"site": "a"}}},
					func(d store.Device) error {
						if d.Labels["site"] != "a" || !d.Online {
							return fmt.Errorf("device %+v", d)
						}
						return nil
					})
				want = append(want, id)
			}
			spool := uint64(r)
			submit(Update{DeviceID: id, At: at, State: &pb.ReportedState{SpoolDepth: spool, Health: pb.Health_HEALTH_OK}},
				func(d store.Device) error {
					// A later state of the same group may be stored
					// already; never an earlier one.
					if d.SpoolDepth < spool {
						return fmt.Errorf("spool depth %d, want at least %d", d.SpoolDepth, spool)
					}
					return nil
				})
			gen := uint64(r + 1)
			submit(Update{DeviceID: id, At: at, Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_ACTIVATED, Generation: gen}},
				func(d store.Device) error {
					for _, e := range d.LastEvents {
						if e.Generation == gen {
							return nil
						}
					}
					return fmt.Errorf("event of generation %d not among %+v", gen, d.LastEvents)
				})
			want = append(want, id, id)
		}
	}
	// Queued but maybe not stored yet when the writer stops: still stored.
	submit(Update{DeviceID: "late", At: at, Presence: &pb.Presence{Online: true}}, func(d store.Device) error {
		if !d.Online {
			return fmt.Errorf("late device offline")
		}
		return nil
	})
	want = append(want, "late")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, p := range problems {
		t.Error(p)
	}
	if fmt.Sprint(order) != fmt.Sprint(want) {
		t.Fatalf("follow-ups ran in order\n%v\nwant arrival order\n%v", order, want)
	}
}

func TestSubmitRefusesAnEmptyUpdate(t *testing.T) {
	inv := New(openStore(t), nil, nil)
	if err := inv.Submit(context.Background(), Update{DeviceID: "x"}); err == nil {
		t.Fatal("Submit of an update without a message succeeded")
	}
}
