// Package telemetry ingests the telemetry batches agents send from their
// spools. Delivery on the wire is at least once (an agent resends until it
// sees an ack); storage is exactly once: a batch's records are stored in a
// transaction that ignores (device, spool epoch, seq) already stored, and
// only after the commit does the controller publish a TelemetryAck naming
// the stored sequence numbers, so the agent can delete them.
//
// Ingest is a pipeline with a group commit. The link's worker hands each
// message over (Handle) and goes on reading; decoders (Run, one per core)
// decompress and decode batches in parallel, each device's batches always
// on the same decoder, so they reach the writer in the order they came;
// one writer goroutine (Run) takes every batch that has arrived, stores
// them all in one transaction (one disk sync for all), and then publishes
// one ack per device. Under load the groups grow, so the cost of a commit
// is shared by more batches; idle, a group is one batch and waits for
// nobody.
//
// Acks are delayed a little, as TCP delays its acks: an ack covering a
// single batch waits for the next group commit when a later batch of the
// same device is already queued, so one ack covers both. An ack costs a
// trip through the broker (a large part of what ingest adds to raw
// delivery, BENCHMARKS.md), and the delay is bounded by one commit: the
// queued batch is in the next group. Acks go out with QoS 0, as TCP's
// acks are not acked either: the agent resends whatever stays
// unacknowledged (after its ack timeout, and on every reconnect), and the
// store ignores the resent records as duplicates and acks them again.
package telemetry

import (
	"cmp"
	"context"
	"fmt"
	"hash/maphash"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/controller/inventory"
	"github.com/edgefleet/edgefleet/controller/link"
	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// MaxSpoolEpoch caps the length of a batch's spool epoch id.
const MaxSpoolEpoch = 128

// Store is what ingest needs from the controller's store.
type Store interface {
	StoreTelemetryBatches(ctx context.Context, batches []store.TelemetryBatch) ([]store.TelemetryResult, error)
}

// Publisher publishes the acks.
type Publisher interface {
	// PublishAtMostOnce publishes with QoS 0, without waiting for the
	// broker. An ack needs no more: one that is lost costs its agent a
	// resend after its ack timeout (or on reconnect), which the store
	// ignores as duplicates and acks again; and a QoS 1 ack cost two more
	// packets and the tracking of each on both sides (with the decoder's
	// fast path, QoS 0 acks took some 9% off ingest's CPU per batch;
	// BENCHMARKS.md).
	PublishAtMostOnce(topic string, payload []byte) error
}

// Options configure an Ingest.
type Options struct {
	Store     Store
	Publisher Publisher
	Logger    *slog.Logger
	Metrics   *metrics.Registry
	Now       func() time.Time
	// QueueSize bounds the batches waiting for the writer (default 4096);
	// Submit waits while it is full, which pushes back on the broker.
	QueueSize int
	// MaxGroup caps the batches of one transaction (default 1024), so one
	// commit never holds the write lock for long.
	MaxGroup int
	// Decoders is how many goroutines decode what Handle hands over
	// (default GOMAXPROCS, at most 8).
	Decoders int
	// KeepRaw keeps compressed batches as they came (Envelope.
	// telemetry_zstd, some 6 bytes a record), for the controller's raw
	// retention. Plain batches are never kept whole: at some 40 bytes a
	// record their WAL writes cost more than the rest of ingest together
	// (BENCHMARKS.md); their records live on as seqs and aggregates.
	KeepRaw bool
}

// Submission is one received batch.
type Submission struct {
	DeviceID string
	// Seen is when the link received it.
	Seen    time.Time
	Epoch   string
	Records []store.TelemetryRecord
	// Inferences, Names and Errors are the batch's per-inference records
	// in compact form (store.TelemetryBatch.Inferences); Records has the
	// others.
	Inferences []store.InferenceRow
	Names      []store.ModelVersion
	Errors     []string
	// Body is the batch as it came on the wire, kept as the raw records
	// (see Options.KeepRaw); nil keeps none.
	Body     []byte
	Encoding store.BodyEncoding
	// Done, when set, is called on the writer after the batch is stored
	// (nil) or its group failed; it must not block.
	Done func(error)
}

// Ingest stores telemetry batches and acks them.
type Ingest struct {
	opts   Options
	queue  chan Submission
	decode []chan handoff
	seed   maphash.Seed

	mu sync.Mutex
	// queued counts each device's batches handed over (Handle, Submit)
	// and not yet taken into a group.
	queued map[string]int
	// owed holds the acks delayed by the last commit.
	owed map[stream]*owedAck

	stored, duplicates, batches, groups, failed, acks, delayed *metrics.Counter
	refused                                                    *metrics.CounterVec
	commitLatency, ackLatency                                  *metrics.Histogram
}

// withoutStore is set only in a controller built with -tags benchnostore
// (nostore.go), a measuring instrument that stores no telemetry.
var withoutStore func(Store) Store

// New returns an Ingest; Run must run for submissions to be stored.
func New(opts Options) *Ingest {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if withoutStore != nil {
		opts.Store = withoutStore(opts.Store)
		opts.Logger.Warn("built with -tags benchnostore: telemetry is acked and NOT stored; for measuring only")
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.NewRegistry()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.MaxGroup <= 0 {
		opts.MaxGroup = 1024
	}
	if opts.Decoders <= 0 {
		opts.Decoders = min(runtime.GOMAXPROCS(0), 8)
	}
	m := opts.Metrics
	in := &Ingest{
		opts:       opts,
		queue:      make(chan Submission, opts.QueueSize),
		decode:     make([]chan handoff, opts.Decoders),
		seed:       maphash.MakeSeed(),
		queued:     map[string]int{},
		owed:       map[stream]*owedAck{},
		acks:       m.Counter("edgefleet_controller_telemetry_acks_total", "Telemetry acks published (one per device and spool epoch per group commit, fewer with delayed acks)."),
		delayed:    m.Counter("edgefleet_controller_telemetry_acks_delayed_total", "Telemetry acks held for one group commit because a later batch of the device was already queued."),
		stored:     m.Counter("edgefleet_controller_telemetry_records_stored_total", "Telemetry records stored for the first time."),
		duplicates: m.Counter("edgefleet_controller_telemetry_duplicates_total", "Telemetry records received again and ignored (already stored): dedupe hits."),
		batches:    m.Counter("edgefleet_controller_telemetry_batches_total", "Telemetry batches stored and acked."),
		groups:     m.Counter("edgefleet_controller_telemetry_commits_total", "Store transactions of telemetry (group commits; batches_total / commits_total is the mean group)."),
		failed:     m.Counter("edgefleet_controller_telemetry_commit_failures_total", "Telemetry group commits that failed; their batches are not acked and come again."),
		refused: m.CounterVec("edgefleet_controller_telemetry_batches_refused_total",
			"Telemetry batches refused unstored, by reason (zstd: a compressed batch that does not decode or expands past the cap; epoch; aggregate).", "reason"),
		commitLatency: m.Histogram("edgefleet_controller_telemetry_commit_seconds", "Time of one telemetry store transaction, commit included.", metrics.LatencyBuckets),
		ackLatency:    m.Histogram("edgefleet_controller_telemetry_ack_seconds", "Time from receiving a telemetry batch to publishing its ack (queue wait and commit).", metrics.LatencyBuckets),
	}
	m.GaugeFunc("edgefleet_controller_telemetry_queue_depth", "Telemetry batches received and waiting for the store.", func() float64 { return float64(len(in.queue)) })
	per := max(opts.QueueSize/opts.Decoders/4, 16)
	for i := range in.decode {
		in.decode[i] = make(chan handoff, per)
	}
	return in
}

// handoff is a telemetry message waiting for a decoder.
type handoff struct {
	m        link.Message
	onEvents func(error)
}

// Handle hands a telemetry message over to be decoded (FromMessage) and
// stored: the link's worker calls it and goes on reading, while a decoder
// owned by Run does the work. It waits while that decoder's queue is
// full, until ctx ends, which pushes back on the broker. A batch that does
// not decode is refused there: logged with its device and not acked.
// onEvents, when not nil, becomes the Done of a batch that carries events.
func (in *Ingest) Handle(ctx context.Context, m link.Message, onEvents func(error)) error {
	// One decoder per device keeps a device's batches in order.
	ch := in.decode[maphash.String(in.seed, m.DeviceID)%uint64(len(in.decode))]
	in.addQueued(m.DeviceID, 1)
	select {
	case ch <- handoff{m: m, onEvents: onEvents}:
		return nil
	case <-ctx.Done():
		in.addQueued(m.DeviceID, -1)
		in.releaseAcks(m.DeviceID)
		return ctx.Err()
	}
}

// decoder decodes handed-over messages and queues them for the writer.
func (in *Ingest) decoder(ctx context.Context, ch <-chan handoff) {
	for {
		select {
		case <-ctx.Done():
			return
		case h := <-ch:
			sub, err := in.FromMessage(h.m)
			if err == nil {
				if h.onEvents != nil && sub.HasEvents() {
					sub.Done = h.onEvents
				}
				err = in.submit(ctx, sub, false)
			}
			if err != nil {
				in.addQueued(h.m.DeviceID, -1)
				in.releaseAcks(h.m.DeviceID)
				if ctx.Err() == nil {
					in.opts.Logger.Error("telemetry batch refused", "device", h.m.DeviceID, "topic", h.m.Topic, "err", err)
				}
			}
		}
	}
}

// releaseAcks publishes the held acks of device id: the batch they waited
// for will not be stored.
func (in *Ingest) releaseAcks(id string) {
	in.flushAcks(func(k stream, _ *owedAck) bool { return k.id != id })
}

// addQueued counts n more batches of device id queued.
func (in *Ingest) addQueued(id string, n int) {
	in.mu.Lock()
	if v := in.queued[id] + n; v > 0 {
		in.queued[id] = v
	} else {
		delete(in.queued, id)
	}
	in.mu.Unlock()
}

// FromMessage turns a telemetry message into a Submission: the batch,
// plain or compressed (expanded under wire.MaxDecompressed), decoded by
// DecodeBatch, and the raw body to keep. A plain batch is m.Batch when the
// link left it serialized (LazyTelemetry).
func (in *Ingest) FromMessage(m link.Message) (Submission, error) {
	sub := Submission{DeviceID: m.DeviceID, Seen: m.Received}
	raw := m.Batch
	switch {
	case m.Envelope.GetTelemetryZstd() != nil:
		z := m.Envelope.GetTelemetryZstd()
		// The expanded batch is only read by DecodeBatch, which copies
		// what it keeps: its buffer is reused.
		buf := expanded.Get().(*[]byte)
		defer expanded.Put(buf)
		var err error
		if raw, err = decompress(z, (*buf)[:0]); err != nil {
			in.refused.With("zstd").Inc()
			return sub, fmt.Errorf("telemetry of %s: %w", m.DeviceID, err)
		}
		*buf = raw
		sub.Body, sub.Encoding = z, store.BodyZstd
	case raw == nil && m.Envelope.GetTelemetry() != nil:
		// The link decoded it already (no LazyTelemetry): take its bytes
		// out of the payload rather than marshal it again.
		if raw = envelopeField(m.Payload, 14); raw == nil {
			var err error
			if raw, err = proto.Marshal(m.Envelope.GetTelemetry()); err != nil {
				return sub, fmt.Errorf("telemetry of %s: %w", m.DeviceID, err)
			}
		}
	case raw != nil:
	default:
		return sub, fmt.Errorf("telemetry of %s: the message carries no telemetry batch", m.DeviceID)
	}
	d, err := DecodeBatch(m.DeviceID, m.Received, raw)
	if err != nil {
		in.refused.With("malformed").Inc()
		return sub, fmt.Errorf("telemetry of %s: %w", m.DeviceID, err)
	}
	sub.Epoch, sub.Records = d.Epoch, d.Records
	sub.Inferences, sub.Names, sub.Errors = d.Inferences, d.Names, d.Errors
	if !in.opts.KeepRaw {
		sub.Body, sub.Encoding = nil, store.BodyNone
	}
	return sub, nil
}

// envelopeField returns the bytes of length-delimited field num of a
// serialized message, nil if absent or malformed.
func envelopeField(msg []byte, num protowire.Number) []byte {
	var out []byte
	for len(msg) > 0 {
		n, typ, l := protowire.ConsumeTag(msg)
		if l < 0 {
			return nil
		}
		msg = msg[l:]
		if n == num && typ == protowire.BytesType {
			v, l := protowire.ConsumeBytes(msg)
			if l < 0 {
				return nil
			}
			out = v // the last occurrence wins, as in proto.Unmarshal
			msg = msg[l:]
			continue
		}
		l = protowire.ConsumeFieldValue(n, typ, msg)
		if l < 0 {
			return nil
		}
		msg = msg[l:]
	}
	return out
}

// Submit queues a batch for the writer. It waits while the queue is full,
// until ctx ends. A batch refused here (an oversized epoch, a malformed
// aggregate) is not acked; its error names what to fix.
func (in *Ingest) Submit(ctx context.Context, s Submission) error {
	return in.submit(ctx, s, true)
}

// submit is Submit; count says s is not counted in queued yet (Handle
// counted it).
func (in *Ingest) submit(ctx context.Context, s Submission, count bool) error {
	if len(s.Epoch) > MaxSpoolEpoch {
		in.refused.With("epoch").Inc()
		return fmt.Errorf("telemetry of %s: spool epoch is %d bytes; the limit is %d", s.DeviceID, len(s.Epoch), MaxSpoolEpoch)
	}
	for _, r := range s.Records {
		if a := r.Aggregate; a != nil {
			if err := summary.CheckAggregate(a); err != nil {
				// Storing the rest and acking all would lose the aggregate
				// for good; refusing keeps it in the agent's spool, where
				// a fixed agent or controller can still get it.
				in.refused.With("aggregate").Inc()
				return fmt.Errorf("telemetry of %s, seq %d: %w", s.DeviceID, r.Seq, err)
			}
		}
	}
	if count {
		in.addQueued(s.DeviceID, 1)
	}
	select {
	case in.queue <- s:
		return nil
	case <-ctx.Done():
		if count {
			in.addQueued(s.DeviceID, -1)
			in.releaseAcks(s.DeviceID)
		}
		return ctx.Err()
	}
}

// Batch stores one batch of device id and returns once it is committed
// and its ack published. Run must be running.
func (in *Ingest) Batch(ctx context.Context, id string, seen time.Time, b *pb.TelemetryBatch) error {
	done := make(chan error, 1)
	recs := make([]store.TelemetryRecord, 0, len(b.GetRecords()))
	for _, r := range b.GetRecords() {
		recs = append(recs, recordFrom(id, r, seen))
	}
	sub := Submission{DeviceID: id, Seen: seen, Epoch: b.GetSpoolEpoch(), Records: recs, Done: func(err error) { done <- err }}
	if err := in.Submit(ctx, sub); err != nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run runs the decoders and the writer, which stores what was queued, a
// group per transaction, until ctx ends. Batches still queued then are
// dropped unacked; their agents send them again.
func (in *Ingest) Run(ctx context.Context) error {
	var g errgroup.Group
	for _, ch := range in.decode {
		g.Go(func() error {
			in.decoder(ctx, ch)
			return nil
		})
	}
	g.Go(func() error {
		in.write(ctx)
		return nil
	})
	return g.Wait()
}

// write is the writer.
func (in *Ingest) write(ctx context.Context) {
	// Acks still held are due: their batches are stored.
	defer in.flushAcks(nil)
	group := make([]Submission, 0, in.opts.MaxGroup)
	for {
		group = group[:0]
		select {
		case <-ctx.Done():
			return
		case s := <-in.queue:
			group = append(group, s)
		}
	fill:
		for len(group) < in.opts.MaxGroup {
			select {
			case s := <-in.queue:
				group = append(group, s)
			default:
				break fill
			}
		}
		in.mu.Lock()
		for _, s := range group {
			if v := in.queued[s.DeviceID] - 1; v > 0 {
				in.queued[s.DeviceID] = v
			} else {
				delete(in.queued, s.DeviceID)
			}
		}
		in.mu.Unlock()
		in.commit(ctx, group)
	}
}

func (in *Ingest) commit(ctx context.Context, group []Submission) {
	batches := make([]store.TelemetryBatch, len(group))
	for i, s := range group {
		batches[i] = store.TelemetryBatch{DeviceID: s.DeviceID, Epoch: s.Epoch, Seen: s.Seen, Records: s.Records, Body: s.Body, Encoding: s.Encoding,
			Inferences: s.Inferences, Names: s.Names, Errors: s.Errors}
	}
	start := time.Now()
	results, err := in.opts.Store.StoreTelemetryBatches(ctx, batches)
	in.commitLatency.Observe(time.Since(start).Seconds())
	in.groups.Inc()
	if err != nil {
		// No ack: the agents keep the records and send them again.
		in.failed.Inc()
		if ctx.Err() == nil {
			in.opts.Logger.Error("store telemetry", "batches", len(group), "err", err)
		}
		for _, s := range group {
			if s.Done != nil {
				s.Done(fmt.Errorf("telemetry of %s: %w", s.DeviceID, err))
			}
		}
		// Acks held by the last commit are due all the same.
		in.flushAcks(nil)
		return
	}
	// One ack per device and spool epoch of the group: under load an
	// agent's whole window lands in one group, and one ack naming all of
	// it retires every batch it covers (the agent matches acks to batches
	// by seq, not one to one).
	in.mu.Lock()
	for i, s := range group {
		res := results[i]
		in.stored.Add(uint64(res.Inserted))
		in.duplicates.Add(uint64(res.Duplicates))
		in.batches.Inc()
		k := stream{s.DeviceID, s.Epoch}
		o := in.owed[k]
		if o == nil {
			o = &owedAck{}
			in.owed[k] = o
		}
		o.batches++
		o.grouped = true
		for _, r := range s.Records {
			o.seqs.add(r.Seq)
		}
		for _, r := range s.Inferences {
			o.seqs.add(r.Seq)
		}
	}
	in.mu.Unlock()
	in.flushAcks(func(k stream, o *owedAck) bool {
		// Held once at most: a single batch's ack, while a later batch of
		// the device is queued (so in the next group).
		if o.grouped && o.batches == 1 && in.queued[k.id] > 0 {
			o.grouped = false
			in.delayed.Inc()
			return true
		}
		return false
	})
	for _, s := range group {
		in.ackLatency.Observe(time.Since(s.Seen).Seconds())
		if s.Done != nil {
			s.Done(nil)
		}
	}
}

// stream is one device's spool epoch: what an ack is addressed to.
type stream struct{ id, epoch string }

// owedAck is an ack not yet published: the stored seqs of a stream.
type owedAck struct {
	seqs    seqSet
	batches int
	// grouped is set when the last commit stored a batch of the stream.
	grouped bool
}

// flushAcks publishes the owed acks, except those hold (under in.mu)
// says to keep for the next commit; a nil hold publishes all.
func (in *Ingest) flushAcks(hold func(stream, *owedAck) bool) {
	type due struct {
		k    stream
		seqs seqSet
	}
	var out []due
	in.mu.Lock()
	for k, o := range in.owed {
		if hold != nil && hold(k, o) {
			continue
		}
		out = append(out, due{k, o.seqs})
		delete(in.owed, k)
	}
	in.mu.Unlock()
	now := in.opts.Now()
	for _, d := range out {
		if err := in.ack(d.k.id, d.k.epoch, d.seqs, now); err != nil {
			in.opts.Logger.Error("telemetry ack", "device", d.k.id, "err", err)
		}
	}
}

// ack publishes the stored seqs of a device's spool epoch: all of its
// batches' records, new and duplicate alike (a duplicate is stored, just
// not now). An empty batch is acked with no ranges, so the agent still
// learns the controller listens.
func (in *Ingest) ack(id, epoch string, seqs seqSet, now time.Time) error {
	payload, err := wire.Seal(id, now, &pb.TelemetryAck{SpoolEpoch: epoch, Stored: seqs.ranges()})
	if err != nil {
		return fmt.Errorf("seal ack: %w", err)
	}
	in.acks.Inc()
	if err := in.opts.Publisher.PublishAtMostOnce(wire.Topic(id, wire.KindAck), payload); err != nil {
		// The records are stored; the agent resends them, they are
		// ignored as duplicates and acked again.
		in.opts.Logger.Warn("telemetry ack not sent", "device", id, "epoch", epoch, "err", err)
	}
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
	case *pb.TelemetryRecord_Aggregate:
		rec.Kind = store.RecordAggregate
		rec.Aggregate = body.Aggregate
		rec.Model, rec.Version = body.Aggregate.GetModel(), body.Aggregate.GetVersion()
	case *pb.TelemetryRecord_Sample:
		rec.Kind = store.RecordSample
		rec.Model, rec.Version = body.Sample.GetModel(), body.Sample.GetVersion()
	}
	return rec
}

// Ranges sorts seqs, drops repeats, and coalesces consecutive numbers into
// inclusive ranges: 1,2,3,5,7,8 -> [1-3] [5-5] [7-8].
func Ranges(seqs []uint64) []*pb.SeqRange {
	var s seqSet
	for _, v := range seqs {
		s.add(v)
	}
	return s.ranges()
}

// seqSet collects seqs as inclusive ranges, extending the last one while
// they follow on: an agent's batch of consecutive seqs is one range, not
// a number per record.
type seqSet []seqSpan

type seqSpan struct{ first, last uint64 }

func (s *seqSet) add(v uint64) {
	if n := len(*s); n > 0 && (*s)[n-1].last != ^uint64(0) && (*s)[n-1].last+1 == v {
		(*s)[n-1].last = v
		return
	}
	*s = append(*s, seqSpan{v, v})
}

// ranges returns the set as sorted, disjoint ranges, coalescing those
// that overlap or touch.
func (s seqSet) ranges() []*pb.SeqRange {
	if len(s) == 0 {
		return nil
	}
	sorted := slices.Clone(s)
	slices.SortFunc(sorted, func(a, b seqSpan) int { return cmp.Compare(a.first, b.first) })
	out := []*pb.SeqRange{{First: sorted[0].first, Last: sorted[0].last}}
	for _, r := range sorted[1:] {
		last := out[len(out)-1]
		if last.Last == ^uint64(0) || r.first <= last.Last+1 {
			last.Last = max(last.Last, r.last)
			continue
		}
		out = append(out, &pb.SeqRange{First: r.first, Last: r.last})
	}
	return out
}

// HasEvents reports whether a submission carries deployment events (which
// move rollouts once stored).
func (s Submission) HasEvents() bool {
	for _, r := range s.Records {
		if r.Kind == store.RecordEvent {
			return true
		}
	}
	return false
}
