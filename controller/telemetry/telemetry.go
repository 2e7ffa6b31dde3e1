// Package telemetry ingests the telemetry batches agents send from their
// spools. Delivery on the wire is at least once (an agent resends until it
// sees an ack); storage is exactly once: every record of a batch is inserted
// in one transaction, ignoring (device, spool epoch, seq) already stored,
// and only after the commit does the controller publish a TelemetryAck
// naming the stored sequence numbers, so the agent can delete them.
package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/edgefleet/edgefleet/controller/inventory"
	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// MaxSpoolEpoch caps the length of a batch's spool epoch id.
const MaxSpoolEpoch = 128

// Store is what ingest needs from the controller's store.
type Store interface {
	StoreTelemetry(ctx context.Context, id, epoch string, seen time.Time, recs []store.TelemetryRecord) (store.TelemetryResult, error)
}

// Publisher publishes the acks.
type Publisher interface {
	// PublishAsync publishes with QoS 1 and reports the outcome to done
	// later; it must not wait for the broker (it runs on the message worker).
	PublishAsync(topic string, payload []byte, retained bool, done func(error))
}

// Options configure an Ingest.
type Options struct {
	Store     Store
	Publisher Publisher
	Logger    *slog.Logger
	Metrics   *metrics.Registry
	Now       func() time.Time
}

// Ingest stores telemetry batches and acks them.
type Ingest struct {
	opts       Options
	stored     *metrics.Counter
	duplicates *metrics.Counter
	batches    *metrics.Counter
}

// New returns an Ingest.
func New(opts Options) *Ingest {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.NewRegistry()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Ingest{
		opts:       opts,
		stored:     opts.Metrics.Counter("edgefleet_controller_telemetry_records_stored_total", "Telemetry records stored for the first time."),
		duplicates: opts.Metrics.Counter("edgefleet_controller_telemetry_duplicates_total", "Telemetry records received again and ignored (already stored)."),
		batches:    opts.Metrics.Counter("edgefleet_controller_telemetry_batches_total", "Telemetry batches stored and acked."),
	}
}

// Batch stores one batch of device id and, once it is committed, publishes
// the ack. An empty batch is acked with no ranges, so the agent still learns
// the controller is listening.
func (in *Ingest) Batch(ctx context.Context, id string, seen time.Time, b *pb.TelemetryBatch) error {
	epoch := b.GetSpoolEpoch()
	if len(epoch) > MaxSpoolEpoch {
		return fmt.Errorf("telemetry of %s: spool epoch is %d bytes; the limit is %d", id, len(epoch), MaxSpoolEpoch)
	}
	recs := make([]store.TelemetryRecord, 0, len(b.GetRecords()))
	seqs := make([]uint64, 0, len(b.GetRecords()))
	for _, r := range b.GetRecords() {
		recs = append(recs, recordFrom(id, r, seen))
		seqs = append(seqs, r.GetSeq())
	}
	res, err := in.opts.Store.StoreTelemetry(ctx, id, epoch, seen, recs)
	if err != nil {
		// No ack: the agent keeps the records and sends them again.
		return fmt.Errorf("telemetry of %s: %w", id, err)
	}
	in.stored.Add(uint64(res.Inserted))
	in.duplicates.Add(uint64(res.Duplicates))
	in.batches.Inc()

	ack := &pb.TelemetryAck{SpoolEpoch: epoch, Stored: Ranges(seqs)}
	payload, err := wire.Seal(id, in.opts.Now(), ack)
	if err != nil {
		return fmt.Errorf("telemetry of %s: seal ack: %w", id, err)
	}
	log := in.opts.Logger
	log.Debug("telemetry stored", "device", id, "epoch", epoch, "records", len(recs), "new", res.Inserted, "duplicates", res.Duplicates)
	in.opts.Publisher.PublishAsync(wire.Topic(id, wire.KindAck), payload, false, func(err error) {
		if err != nil {
			// The records are stored; the agent resends them, they are
			// ignored as duplicates and acked again.
			log.Warn("telemetry ack not delivered", "device", id, "epoch", epoch, "err", err)
		}
	})
	return nil
}

func recordFrom(id string, r *pb.TelemetryRecord, seen time.Time) store.TelemetryRecord {
	rec := store.TelemetryRecord{Seq: r.GetSeq(), Kind: store.RecordOther, At: seen}
	switch body := r.GetBody().(type) {
	case *pb.TelemetryRecord_Inference:
		inf := body.Inference
		rec.Kind = store.RecordInference
		rec.Model, rec.Version = inf.GetModel(), inf.GetVersion()
		rec.LatencyUS, rec.Error = inf.GetLatencyUs(), inf.GetError()
		if ms := inf.GetAtUnixMs(); ms > 0 {
			rec.At = time.UnixMilli(ms)
		}
	case *pb.TelemetryRecord_Event:
		ev := inventory.EventFrom(id, body.Event, seen)
		rec.Kind = store.RecordEvent
		rec.Model, rec.Version, rec.Error = ev.Model, ev.Version, ""
		rec.At = ev.At
		rec.Event = &ev
	}
	return rec
}

// Ranges sorts seqs, drops repeats, and coalesces consecutive numbers into
// inclusive ranges: 1,2,3,5,7,8 -> [1-3] [5-5] [7-8].
func Ranges(seqs []uint64) []*pb.SeqRange {
	if len(seqs) == 0 {
		return nil
	}
	s := slices.Clone(seqs)
	slices.Sort(s)
	s = slices.Compact(s)
	out := []*pb.SeqRange{{First: s[0], Last: s[0]}}
	for _, v := range s[1:] {
		last := out[len(out)-1]
		if v == last.Last+1 {
			last.Last = v
			continue
		}
		out = append(out, &pb.SeqRange{First: v, Last: v})
	}
	return out
}
