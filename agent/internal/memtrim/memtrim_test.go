package memtrim

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// trimmerFor is a Trimmer whose release only notes when it ran, so the
// test sees when it trims without depending on what the kernel maps.
func trimmerFor(quiet time.Duration) (*Trimmer, func() []time.Time) {
	var mu sync.Mutex
	var at []time.Time
	t := New(quiet, nil)
	t.release = func() (int64, error) {
		mu.Lock()
		at = append(at, time.Now())
		mu.Unlock()
		return 0, nil
	}
	return t, func() []time.Time {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(at)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A trim comes only after quiet time without work, once per burst of
// work. The checks hold however late the scheduler runs the test on a
// loaded machine: each trim is compared with the work before it.
func TestTrimmerTrimsOncePerBurst(t *testing.T) {
	const quiet = 50 * time.Millisecond
	tr, trims := trimmerFor(quiet)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tr.Run(ctx) }()

	// Start-up counts as work: one trim once it settles.
	waitFor(t, "the start-up trim", func() bool { return len(trims()) == 1 })

	// A burst of work, more often than quiet.
	var busy []time.Time
	for range 40 {
		busy = append(busy, time.Now())
		tr.Busy()
		time.Sleep(quiet / 10)
	}
	waitFor(t, "the trim after the burst", func() bool { return len(trims()) >= 2 })
	time.Sleep(4 * quiet)
	got := trims()[1:]
	// Each trim during or after the burst came at least quiet after the
	// work before it (only a late scheduler makes a gap in the burst).
	for _, at := range got {
		var before time.Time
		for _, b := range busy {
			if b.Before(at) {
				before = b
			}
		}
		if at.Sub(before) < quiet {
			t.Errorf("a trim %v after work, want at least %v", at.Sub(before), quiet)
		}
	}
	// And the last one followed the burst's last work: nothing is left
	// untrimmed, and no trim repeats without work.
	if last := got[len(got)-1]; last.Before(busy[len(busy)-1]) {
		t.Errorf("no trim after the burst's last work")
	}
	n := len(trims())
	time.Sleep(4 * quiet)
	if m := len(trims()); m != n || tr.Trims() != uint64(m) {
		t.Errorf("%d trims, then %d without work (Trims() %d)", n, m, tr.Trims())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestNilTrimmer(t *testing.T) {
	var tr *Trimmer = New(0, nil)
	if tr != nil {
		t.Fatal("New(0) returned a trimmer; 0 means off")
	}
	tr.Busy() // must not panic
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := tr.Run(ctx); err != nil || tr.Trims() != 0 {
		t.Fatalf("nil trimmer: %v, %d trims", err, tr.Trims())
	}
}
