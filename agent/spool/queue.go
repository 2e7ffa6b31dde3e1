package spool

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Appender is what a Queue writes to; both spools are Appenders.
type Appender interface {
	Append(ctx context.Context, recs []*pb.TelemetryRecord) error
}

// QueueOptions tunes a Queue. Zero fields take the defaults.
type QueueOptions struct {
	// Capacity bounds the records waiting in memory (default 8192). When it
	// is full, Add drops the record and counts it rather than block an
	// inference request on the disk.
	Capacity int
	// MaxBatch flushes as soon as this many records wait (default 256).
	MaxBatch int
	// Interval flushes a partial batch this long after its first record
	// (default 5ms).
	Interval time.Duration
	// Flushed, if set, is called after each successful flush, so a sender
	// can pick the new records up without polling.
	Flushed func()
	Logger  *slog.Logger
}

// Queue batches appends in front of a spool: callers hand records to Add,
// which never waits on the disk, and one writer goroutine (Run) appends them
// a batch at a time. One transaction per batch instead of per record is what
// lets the spool keep up with inference rates on an SD card.
type Queue struct {
	to      Appender
	o       QueueOptions
	ch      chan *pb.TelemetryRecord
	dropped [kindAggregate + 1]atomic.Uint64 // by kind
}

// NewQueue returns a queue writing to the Appender.
func NewQueue(to Appender, o QueueOptions) *Queue {
	if o.Capacity <= 0 {
		o.Capacity = 8192
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 256
	}
	if o.Interval <= 0 {
		o.Interval = 5 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Queue{to: to, o: o, ch: make(chan *pb.TelemetryRecord, o.Capacity)}
}

// Add queues rec for the writer. It never blocks: when the queue is full
// the record is dropped, counted, and Add returns false.
func (q *Queue) Add(rec *pb.TelemetryRecord) bool {
	select {
	case q.ch <- rec:
		return true
	default:
		q.dropped[kindOf(rec)].Add(1)
		return false
	}
}

// Dropped counts the records Add dropped because the queue was full, plus
// records whose batch could not be written.
func (q *Queue) Dropped() uint64 {
	var n uint64
	for i := range q.dropped {
		n += q.dropped[i].Load()
	}
	return n
}

// DroppedByClass splits Dropped by class, with the names of Stats.ByClass.
func (q *Queue) DroppedByClass() map[string]uint64 {
	return Stats{DroppedRaw: q.dropped[kindRaw].Load(), DroppedInference: q.dropped[kindInference].Load(),
		DroppedAggregate: q.dropped[kindAggregate].Load(), DroppedEvent: q.dropped[kindEvent].Load()}.ByClass()
}

// Run writes queued records until ctx ends, then writes what is still
// queued (with a short deadline of its own) and returns nil.
func (q *Queue) Run(ctx context.Context) error {
	batch := make([]*pb.TelemetryRecord, 0, q.o.MaxBatch)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case r := <-q.ch:
					batch = append(batch, r)
					continue
				default:
				}
				break
			}
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			q.flush(fctx, batch)
			cancel()
			return nil
		case r := <-q.ch:
			batch = append(batch, r)
			if len(batch) == 1 {
				timer.Reset(q.o.Interval)
			}
			if len(batch) < q.o.MaxBatch {
				continue
			}
			timer.Stop()
		case <-timer.C:
		}
		q.flush(ctx, batch)
		batch = batch[:0]
	}
}

func (q *Queue) flush(ctx context.Context, batch []*pb.TelemetryRecord) {
	if len(batch) == 0 {
		return
	}
	if err := q.to.Append(ctx, batch); err != nil {
		// The records are lost; count them so the loss shows in the
		// reported state instead of vanishing.
		for _, r := range batch {
			q.dropped[kindOf(r)].Add(1)
		}
		q.o.Logger.Error("spool write failed; records dropped", "records", len(batch), "err", err)
		return
	}
	if q.o.Flushed != nil {
		q.o.Flushed()
	}
}
