package store

import (
	"context"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
)

// TestApplyDeviceUpdatesMatchesOneByOne: a random stream of hellos,
// states, presences and events, stored in groups of random sizes, leaves
// the store as storing each message in its own transaction does, while
// coalescing overwritten states and presences.
func TestApplyDeviceUpdatesMatchesOneByOne(t *testing.T) {
	ctx := context.Background()
	for seed := range uint64(4) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			us := randomUpdates(rng, 300, 5)
			one, group := newStore(t), newStore(t)
			for _, u := range us {
				if err := applyOne(ctx, one, u); err != nil {
					t.Fatal(err)
				}
			}
			skipped := 0
			for rest := us; len(rest) > 0; {
				n := min(1+rng.IntN(40), len(rest))
				res, err := group.ApplyDeviceUpdates(ctx, rest[:n])
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range res {
					if r.Skipped {
						skipped++
					}
				}
				rest = rest[n:]
			}
			want, err := one.Devices(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got, err := group.Devices(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("group commit stored\n%+v\none by one stored\n%+v", got, want)
			}
			var nOne, nGroup int
			one.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM events`).Scan(&nOne)
			group.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM events`).Scan(&nGroup)
			if nOne != nGroup || nOne == 0 {
				t.Fatalf("events: %d stored in groups, %d one by one", nGroup, nOne)
			}
			if skipped == 0 {
				t.Fatal("no update was coalesced: the test does not exercise coalescing")
			}
		})
	}
}

func randomUpdates(rng *rand.Rand, n, devices int) []DeviceUpdate {
	var us []DeviceUpdate
	at := t0
	for i := range n {
		id := fmt.Sprintf("d%d", rng.IntN(devices))
		at = at.Add(time.Duration(rng.IntN(2000)-500) * time.Millisecond) // not always forward
		u := DeviceUpdate{ID: id, At: at}
		version := []string{"", "1.0.0", "1.1.0"}[rng.IntN(3)]
		report := &Report{State: []byte{byte(i)}, Health: []string{HealthOK, HealthFailing, ""}[rng.IntN(3)],
			ReportedGeneration: uint64(rng.IntN(5)), SpoolDepth: uint64(i), AgentVersion: version}
		switch rng.IntN(8) {
		case 0:
			h := &Hello{ID: id, At: at, Labels: map[string]string{"n": fmt.Sprint(i)}, AgentVersion: "1.0.0", OS: "linux", Arch: "arm64"}
			if rng.IntN(2) == 0 {
				h.Report = report
			}
			u.Hello = h
		case 1, 2, 3:
			u.Report = report
		case 4, 5:
			online := rng.IntN(2) == 0
			u.Online = &online
		default:
			u.Event = &Event{DeviceID: id, Kind: "activated", Slot: "default", Model: "m", Version: version, Generation: uint64(i), At: at}
		}
		us = append(us, u)
	}
	return us
}

func applyOne(ctx context.Context, s *Store, u DeviceUpdate) error {
	switch {
	case u.Hello != nil:
		return s.UpsertHello(ctx, *u.Hello)
	case u.Report != nil:
		return s.UpdateReport(ctx, u.ID, u.At, *u.Report)
	case u.Online != nil:
		return s.SetPresence(ctx, u.ID, *u.Online, u.At)
	default:
		return s.AppendEvent(ctx, *u.Event, u.At)
	}
}

func TestApplyDeviceUpdatesDesiredGenerationAndChecks(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	if _, err := s.ApplyDeviceUpdates(ctx, []DeviceUpdate{{ID: "a", At: t0, Hello: &Hello{ID: "a", At: t0}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.ExecContext(ctx, `INSERT INTO desired_states (device_id, generation, issued_ms, doc) VALUES ('a', 7, 0, x'00')`); err != nil {
		t.Fatal(err)
	}
	online := true
	res, err := s.ApplyDeviceUpdates(ctx, []DeviceUpdate{
		{ID: "a", At: t0, Hello: &Hello{ID: "a", At: t0}},
		{ID: "b", At: t0, Hello: &Hello{ID: "b", At: t0}},
		{ID: "b", At: t0, Online: &online},
	})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].DesiredGeneration != 7 || res[1].DesiredGeneration != 0 || res[2].Skipped {
		t.Fatalf("results = %+v; want generation 7 for a, 0 for b, b's presence written", res)
	}
	for _, bad := range [][]DeviceUpdate{
		{{ID: "a"}},
		{{ID: "a", Online: &online, Report: &Report{}}},
		{{ID: "a", Hello: &Hello{ID: "b"}}},
		{{ID: "a", Event: &Event{DeviceID: "b"}}},
	} {
		if _, err := s.ApplyDeviceUpdates(ctx, bad); err == nil {
			t.Errorf("ApplyDeviceUpdates(%+v) succeeded; want an error", bad[0])
		}
	}
}
