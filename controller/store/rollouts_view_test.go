package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
)

// TestRolloutViewIsOneSnapshot commits, over and over, a rollout whose
// first wave ends and second starts in one transaction, and back, while
// reading it: every view must show both changes or neither.
func TestRolloutViewIsOneSnapshot(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	ro := Rollout{ID: "r", Spec: []byte(`{}`), Slot: "default", Model: "m", Version: "2", Phase: "running", Targets: 3, Open: true,
		Revision: 1, CreatedAt: t0, UpdatedAt: t0}
	// state gives the commit of either side: the first wave running
	// (ended false), or passed with the second one started (ended true).
	state := func(ended bool) RolloutCommit {
		first, second, done, next := "running", "pending", "notified", "pending"
		if ended {
			first, second, done, next = "passed", "running", "healthy", "notified"
		}
		c := RolloutCommit{Rollout: ro,
			Waves: []RolloutWave{{Index: 0, Size: 2, State: first, StartedAt: t0}, {Index: 1, SpecIndex: 1, Size: 1, State: second}},
			Devices: []RolloutDevice{
				{DeviceID: "d0", Wave: 0, Order: 0, Step: done, StepAt: t0},
				{DeviceID: "d1", Wave: 0, Order: 1, Step: done, StepAt: t0},
				{DeviceID: "d2", Wave: 1, Order: 2, Step: next, StepAt: t0},
			},
			History: []string{fmt.Sprintf("ended %v", ended)},
		}
		return c
	}
	c := state(false)
	c.Create = true
	if _, err := s.CommitRollout(ctx, c, nil); err != nil {
		t.Fatal(err)
	}
	const commits = 150
	var wg sync.WaitGroup
	wg.Add(1)
	stop := make(chan struct{})
	var werr error
	go func() {
		defer wg.Done()
		defer close(stop)
		for i := range commits {
			c := state(i%2 == 0)
			c.Rollout.Revision = uint64(i + 2)
			if _, err := s.CommitRollout(ctx, c, nil); err != nil {
				werr = err
				return
			}
		}
	}()
	reads := 0
	for done := false; !done; {
		select {
		case <-stop:
			done = true
		default:
		}
		v, err := s.RolloutView(ctx, "r", 1)
		if err != nil {
			t.Fatal(err)
		}
		reads++
		healthy, notified := 0, 0
		for _, c := range v.Counts {
			switch {
			case c.Wave == 0 && c.Step == "healthy":
				healthy += c.N
			case c.Wave == 1 && c.Step == "notified":
				notified += c.N
			}
		}
		ended := v.Waves[0].State == "passed"
		if ended != (v.Waves[1].State == "running") || ended != (healthy == 2) || ended != (notified == 1) ||
			len(v.History) != 1 || v.History[0].Message != fmt.Sprintf("ended %v", ended) {
			t.Fatalf("read %d saw a state that was never committed: waves %+v, counts %+v, history %+v", reads, v.Waves, v.Counts, v.History)
		}
	}
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	if v, err := s.RolloutView(ctx, "r", 0); err != nil || v.History != nil || v.Rollout.Revision != commits+1 {
		t.Fatalf("last view = %+v, %v", v, err)
	}
	if _, err := s.RolloutView(ctx, "nope", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown rollout: %v", err)
	}
	t.Logf("%d reads during %d commits", reads, commits)
}
