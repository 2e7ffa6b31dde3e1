package sim

import (
	"container/heap"
	"context"
	"math/rand/v2"
	"runtime"
	"sync"
	"time"
)

// drive makes the devices' inferences: each powered device runs Rate
// inferences a second on its active model, with exponential gaps
// (a Poisson process), like independent apps on independent devices.
//
// One goroutine keeps every device's next inference time in a heap and
// hands due devices to a few workers; the fleet does not need a goroutine
// and a timer per device for this. When the workers cannot keep up (the
// machine is out of CPU), the schedule waits for them instead of piling
// up: the achieved rate is in Stats.
func (s *Sim) drive(ctx context.Context) {
	if s.o.Rate <= 0 {
		return
	}
	workers := 2 * runtime.GOMAXPROCS(0)
	work := make(chan *Agent, 4*workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a := range work {
				_, _ = a.Infer(ctx) // outcomes are counted in the device's stats
			}
		}()
	}
	defer func() {
		close(work)
		wg.Wait()
	}()

	gap := func() time.Duration { return time.Duration(rand.ExpFloat64() / s.o.Rate * float64(time.Second)) }
	now := time.Now()
	q := make(schedule, len(s.agents))
	for i := range q {
		q[i] = due{at: now.Add(gap()), i: i}
	}
	heap.Init(&q)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now = time.Now()
		for q[0].at.Compare(now) <= 0 {
			a := s.agents[q[0].i]
			if a.Powered() {
				select {
				case work <- a:
				case <-ctx.Done():
					return
				}
			}
			next := q[0].at.Add(gap())
			if next.Before(now.Add(-time.Second)) {
				// Behind by more than a second: skip what was missed
				// rather than burst to catch up.
				next = now.Add(gap())
			}
			q[0].at = next
			heap.Fix(&q, 0)
		}
		timer.Reset(time.Until(q[0].at))
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
	}
}

// due is when device i next infers.
type due struct {
	at time.Time
	i  int
}

// schedule is a min-heap of due times.
type schedule []due

func (s schedule) Len() int           { return len(s) }
func (s schedule) Less(i, j int) bool { return s[i].at.Before(s[j].at) }
func (s schedule) Swap(i, j int)      { s[i], s[j] = s[j], s[i] }
func (s *schedule) Push(x any)        { *s = append(*s, x.(due)) }
func (s *schedule) Pop() any {
	old := *s
	x := old[len(old)-1]
	*s = old[:len(old)-1]
	return x
}
