// Package groupcommit hands work from the controller's message worker to
// one writer goroutine that stores it in groups: every item queued since
// the last commit goes into the next transaction, so one disk sync serves
// all of them. Under load the groups grow and the cost of a commit is
// shared by more items; idle, a group is one item and waits for nobody.
//
// The queue is bounded: Put waits while it is full, which pushes back on
// whoever feeds it (the MQTT link, and through it the broker) instead of
// growing without limit.
package groupcommit

import "context"

// Queue carries items of type T from producers to one writer, in the order
// they were put.
type Queue[T any] struct {
	ch  chan T
	max int
}

// New returns a queue holding at most size items; a group holds at most
// maxGroup of them, so one commit never holds the database's write lock
// for long. Values below 1 become 1.
func New[T any](size, maxGroup int) *Queue[T] {
	return &Queue[T]{ch: make(chan T, max(size, 1)), max: max(maxGroup, 1)}
}

// Put queues v. It waits while the queue is full, until ctx ends.
func (q *Queue[T]) Put(ctx context.Context, v T) error {
	select {
	case q.ch <- v:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Len returns the number of items waiting, for a queue-depth gauge.
func (q *Queue[T]) Len() int { return len(q.ch) }

// Run waits for items and calls commit with each group, in order, until
// ctx ends. The slice is reused: commit must not keep it. Items still
// queued when ctx ends stay queued (see Drain).
func (q *Queue[T]) Run(ctx context.Context, commit func(group []T)) error {
	group := make([]T, 0, q.max)
	for {
		group = group[:0]
		select {
		case <-ctx.Done():
			return nil
		case v := <-q.ch:
			group = append(group, v)
		}
		group = q.fill(group)
		commit(group)
		clear(group) // let committed items be collected
	}
}

// Drain commits, in groups, what is queued now, without waiting for more:
// for a writer whose last items are worth storing after its producers
// stopped.
func (q *Queue[T]) Drain(commit func(group []T)) {
	group := make([]T, 0, q.max)
	for {
		group = q.fill(group[:0])
		if len(group) == 0 {
			return
		}
		commit(group)
		clear(group)
	}
}

// fill appends what is queued, up to a full group, without waiting.
func (q *Queue[T]) fill(group []T) []T {
	for len(group) < q.max {
		select {
		case v := <-q.ch:
			group = append(group, v)
		default:
			return group
		}
	}
	return group
}
