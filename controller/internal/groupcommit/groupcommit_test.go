package groupcommit

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestGroupsKeepOrder: items put while the writer is busy go into the next
// group together, in order, never more than maxGroup at once; Drain takes
// what is left after Run stops.
func TestGroupsKeepOrder(t *testing.T) {
	q := New[int](100, 4)
	ctx, cancel := context.WithCancel(context.Background())
	release := make(chan struct{})
	var mu sync.Mutex
	var groups [][]int
	done := make(chan error)
	go func() {
		done <- q.Run(ctx, func(g []int) {
			mu.Lock()
			groups = append(groups, slices.Clone(g))
			first := len(groups) == 1
			mu.Unlock()
			if first {
				<-release // hold the first commit while more arrive
			}
		})
	}()
	for i := range 10 {
		if err := q.Put(ctx, i); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(groups) == 1 })
		}
	}
	close(release)
	waitFor(t, func() bool { return q.Len() == 0 })
	waitFor(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, g := range groups {
			n += len(g)
		}
		return n == 10
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	want := [][]int{{0}, {1, 2, 3, 4}, {5, 6, 7, 8}, {9}}
	if !slices.EqualFunc(groups, want, slices.Equal) {
		t.Fatalf("groups = %v, want %v", groups, want)
	}
	mu.Unlock()

	for i := range 6 {
		if err := q.Put(context.Background(), i); err != nil {
			t.Fatal(err)
		}
	}
	var drained [][]int
	q.Drain(func(g []int) { drained = append(drained, slices.Clone(g)) })
	if want := [][]int{{0, 1, 2, 3}, {4, 5}}; !slices.EqualFunc(drained, want, slices.Equal) {
		t.Fatalf("drained %v, want %v", drained, want)
	}
}

// TestPutWaitsWhileFull: a full queue pushes back until ctx ends.
func TestPutWaitsWhileFull(t *testing.T) {
	q := New[int](1, 1)
	if err := q.Put(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := q.Put(ctx, 2); err != context.DeadlineExceeded {
		t.Fatalf("Put on a full queue = %v, want the context's deadline", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}
