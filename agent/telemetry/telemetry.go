// Package telemetry sends the agent's spooled records to the controller
// and deletes them once the controller says it stored them; it also folds
// inferences into the per-interval aggregates that are spooled
// (Aggregator, aggregate.go).
//
// Delivery is at least once: a batch goes out as a TelemetryBatch; only a
// TelemetryAck naming its seqs deletes records from the spool. A batch not
// acknowledged within AckTimeout is sent again (re-read from the spool, so
// records acknowledged in the meantime are not), and every reconnect sends
// everything unacknowledged again from the start, since acks of the old
// connection may have been lost with it. The controller dedupes by
// (device, spool epoch, seq).
//
// At most Window batches wait for their ack at once, which bounds what is
// in flight after a long outage while keeping the link busy.
//
// Batches go out compressed (Envelope.telemetry_zstd, one zstd encoder
// per sender) when the controller takes them. The agent cannot ask, so it
// finds out: on each connection it sends compressed batches until the
// first ack of one proves the controller reads them; if instead a
// compressed batch's ack times out before any was acknowledged, it sends
// plain batches (the resend included) for the rest of that connection. A
// controller that reads both costs nothing; an older one costs one ack
// timeout per connection.
//
// Health and rollout events go first after every (re)connect: the sender
// sends the spool's events (Spool.ReadPriority) before anything else, and
// leaves them out of the in-order pass that follows on that connection, so
// the rollout engine hears of an activation or a rollback before a backlog
// of inference records is through.
package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"sync/atomic"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// Spool is what the sender reads from and deletes in.
type Spool interface {
	Epoch() string
	Read(ctx context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error)
	// ReadPriority is Read restricted to health and rollout events.
	ReadPriority(ctx context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error)
	Delete(ctx context.Context, ranges []*pb.SeqRange) (int, error)
}

// Publisher sends one message to the controller (the MQTT link).
type Publisher interface {
	Publish(ctx context.Context, kind wire.Kind, body proto.Message) error
}

// Options tunes a Sender. Spool and Publisher are required.
type Options struct {
	Spool     Spool
	Publisher Publisher
	Logger    *slog.Logger
	// BatchSize caps records per batch (default 500). A batch is also kept
	// under the payload cap, whatever the records' size.
	BatchSize int
	// Window caps batches waiting for their ack (default 4).
	Window int
	// AckTimeout is how long a batch waits for its ack before it is sent
	// again (default 10s).
	AckTimeout time.Duration
	// PublishTimeout bounds one publish (default 10s).
	PublishTimeout time.Duration
	// Poll is how often the spool is checked without a Poke (default 1s).
	Poll time.Duration
	// Compression says whether batches go out compressed (default
	// CompressAuto).
	Compression Compression
	Now         func() time.Time
}

// Compression is a Sender's use of compressed batches.
type Compression int

const (
	// CompressAuto compresses while the controller acknowledges
	// compressed batches (see the package doc).
	CompressAuto Compression = iota
	// CompressOff sends plain batches only.
	CompressOff
	// CompressAlways compresses every batch, for a controller known to
	// read them.
	CompressAlways
)

// ParseCompression reads "auto", "off" or "zstd".
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "auto", "":
		return CompressAuto, nil
	case "off", "none":
		return CompressOff, nil
	case "zstd":
		return CompressAlways, nil
	}
	return CompressAuto, fmt.Errorf("telemetry compression %q: use auto, zstd or off", s)
}

// zstdState is what a Sender knows on one connection about the
// controller's reading of compressed batches.
type zstdState int

const (
	zstdUnknown zstdState = iota
	zstdYes
	zstdNo
)

// payloadBudget leaves room for the envelope around a batch.
const payloadBudget = wire.MaxPayload - 4<<10

// Sender moves records from the spool to the controller. Create it with
// New, tell it about connections with Connected and Disconnected, feed it
// acks with Ack, and run it with Run.
type Sender struct {
	o     Options
	log   *slog.Logger
	enc   *wire.BatchEncoder // nil: plain batches only
	zstd  zstdState          // owned by Run
	acks  chan *pb.TelemetryAck
	conn  chan bool
	poke  chan struct{}
	stats struct {
		batches, records, resent, acked, badAcks atomic.Uint64
		compressed, bytes, plainBytes            atomic.Uint64
		inflight                                 atomic.Int64
	}
}

// Stats are the sender's counters for /metrics.
type Stats struct {
	// Batches and Records count what was published, resends included.
	Batches, Records uint64
	// Resent counts batches sent again after an ack timeout.
	Resent uint64
	// Acked counts records deleted because the controller acknowledged them.
	Acked uint64
	// BadAcks counts acks for another spool epoch (ignored).
	BadAcks uint64
	// Compressed counts the batches that went out compressed.
	Compressed uint64
	// Bytes counts the batch bytes published (compressed where they were);
	// PlainBytes what the same batches are serialized, uncompressed.
	Bytes, PlainBytes uint64
	// InFlight is the number of batches waiting for their ack now, at most
	// Window.
	InFlight int
	// Window is the configured send window.
	Window int
}

// New returns a Sender; it sends nothing until Connected is called.
func New(o Options) *Sender {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 500
	}
	if o.Window <= 0 {
		o.Window = 4
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = 10 * time.Second
	}
	if o.PublishTimeout <= 0 {
		o.PublishTimeout = 10 * time.Second
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	s := &Sender{o: o, log: o.Logger, acks: make(chan *pb.TelemetryAck, 64), conn: make(chan bool, 8), poke: make(chan struct{}, 1)}
	if o.Compression != CompressOff {
		enc, err := wire.SharedBatchEncoder()
		if err != nil {
			s.log.Error("telemetry compression unavailable; sending plain batches", "err", err)
		}
		s.enc = enc
	}
	return s
}

// Compresses reports whether the sender may send compressed batches (the
// agent then announces wire.CapabilityTelemetryZstd).
func (s *Sender) Compresses() bool { return s.enc != nil }

// Connected tells the sender a (new) connection is up: everything not yet
// acknowledged goes out again. It never blocks.
func (s *Sender) Connected() { s.setConn(true) }

// Disconnected tells the sender the connection is gone. It never blocks.
func (s *Sender) Disconnected() { s.setConn(false) }

func (s *Sender) setConn(up bool) {
	select {
	case s.conn <- up:
	default:
		// Full of stale transitions: the newest one is what matters, and
		// the send loop treats a publish error as offline anyway.
		select {
		case <-s.conn:
		default:
		}
		select {
		case s.conn <- up:
		default:
		}
	}
}

// Poke says new records are in the spool. It never blocks.
func (s *Sender) Poke() {
	select {
	case s.poke <- struct{}{}:
	default:
	}
}

// Ack hands over an ack from the controller. It never blocks: when acks
// pile up the newest is dropped, and its records are simply sent again.
func (s *Sender) Ack(a *pb.TelemetryAck) {
	select {
	case s.acks <- a:
	default:
		s.log.Warn("telemetry ack dropped: sender is behind")
	}
}

// Stats returns the sender's counters.
func (s *Sender) Stats() Stats {
	return Stats{Batches: s.stats.batches.Load(), Records: s.stats.records.Load(), Resent: s.stats.resent.Load(),
		Acked: s.stats.acked.Load(), BadAcks: s.stats.badAcks.Load(), Compressed: s.stats.compressed.Load(),
		Bytes: s.stats.bytes.Load(), PlainBytes: s.stats.plainBytes.Load(), InFlight: int(s.stats.inflight.Load()), Window: s.o.Window}
}

// inflight is a batch waiting for its ack.
type inflight struct {
	first, last uint64
	// pending holds the batch's seqs not acknowledged yet.
	pending map[uint64]bool
	sentAt  time.Time
	// prio marks a batch of events only: it is resent from ReadPriority.
	prio bool
	// compressed marks a batch sent as telemetry_zstd.
	compressed bool
}

// Run sends until ctx ends, then returns nil.
func (s *Sender) Run(ctx context.Context) error {
	var (
		online bool
		cursor uint64 // highest seq sent on this connection
		flight []*inflight
		// The events pass after a connect: its cursor, whether it is done,
		// and the seqs it sent (left out of the in-order pass).
		prioCursor uint64
		prioDone   bool
		prioSent   map[uint64]bool
	)
	tick := time.NewTicker(min(s.o.Poll, s.o.AckTimeout/2))
	defer tick.Stop()
	defer s.stats.inflight.Store(0)
	for {
		s.stats.inflight.Store(int64(len(flight)))
		select {
		case <-ctx.Done():
			return nil
		case up := <-s.conn:
			online = up
			s.zstd = zstdUnknown // a new connection may reach another controller
			cursor, flight = 0, nil
			prioCursor, prioDone, prioSent = 0, false, map[uint64]bool{}
		case a := <-s.acks:
			flight = s.handleAck(ctx, a, flight)
		case <-s.poke:
		case <-tick.C:
		}
		if !online {
			continue
		}
		// Batches past their ack deadline go out again, re-read from the
		// spool so acknowledged records are left out.
		now := s.o.Now()
		keep := flight[:0]
		var expired []*inflight
		for _, f := range flight {
			if now.Sub(f.sentAt) >= s.o.AckTimeout {
				if f.compressed && s.zstd == zstdUnknown && s.o.Compression == CompressAuto {
					s.zstd = zstdNo
					s.log.Warn("the controller acknowledged no compressed telemetry batch; sending plain batches on this connection")
				}
				expired = append(expired, f)
			} else {
				keep = append(keep, f)
			}
		}
		flight = keep
		failed := false
		for i, f := range expired {
			skip := prioSent
			if f.prio {
				skip = nil
			}
			nf, err := s.send(ctx, f.first, f.last, f.prio, skip)
			if err != nil {
				// Keep the rest as they were; the next tick retries them.
				flight = append(flight, expired[i:]...)
				failed = true
				break
			}
			if nf != nil {
				s.stats.resent.Add(1)
				flight = append(flight, nf)
			}
		}
		for !failed && len(flight) < s.o.Window {
			if !prioDone {
				nf, err := s.send(ctx, prioCursor+1, math.MaxUint64, true, nil)
				if err != nil {
					break
				}
				if nf == nil {
					prioDone = true
					continue
				}
				prioCursor = nf.last
				for seq := range nf.pending {
					prioSent[seq] = true
				}
				flight = append(flight, nf)
				continue
			}
			nf, err := s.send(ctx, cursor+1, math.MaxUint64, false, prioSent)
			if err != nil {
				// A publish that failed while the link is up (a timeout, a
				// broken spool read) is retried on the next poke or tick;
				// a lost connection resets everything via Disconnected.
				break
			}
			if nf == nil {
				break // nothing more to send
			}
			cursor = nf.last
			flight = append(flight, nf)
		}
	}
}

// send publishes the records in [from, to] (up to a batch; only events
// when prio) except the seqs in skip, and returns the batch in flight, or
// nil when there was nothing to send.
func (s *Sender) send(ctx context.Context, from, to uint64, prio bool, skip map[uint64]bool) (*inflight, error) {
	read := s.o.Spool.Read
	if prio {
		read = s.o.Spool.ReadPriority
	}
	var recs []*pb.TelemetryRecord
	for len(recs) == 0 {
		got, err := read(ctx, from, to, s.o.BatchSize)
		if err != nil {
			s.log.Error("cannot read the spool", "err", err)
			return nil, err
		}
		if len(got) == 0 {
			return nil, nil
		}
		for _, r := range got {
			if !skip[r.GetSeq()] {
				recs = append(recs, r)
			}
		}
		from = got[len(got)-1].GetSeq() + 1
		if from == 0 || from > to {
			break
		}
	}
	if len(recs) == 0 {
		return nil, nil
	}
	batch := &pb.TelemetryBatch{SpoolEpoch: s.o.Spool.Epoch(), Records: recs}
	for len(batch.Records) > 1 && proto.Size(batch) > payloadBudget {
		batch.Records = batch.Records[:len(batch.Records)/2]
	}
	var body proto.Message = batch
	plain := proto.Size(batch)
	size := plain
	compressed := s.enc != nil && s.zstd != zstdNo
	if compressed {
		z, err := s.enc.Compress(batch)
		if err != nil {
			// Cannot happen for a batch under the budget; send it plain.
			s.log.Error("cannot compress a telemetry batch; sending it plain", "err", err)
			compressed = false
		} else {
			body, size = &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: z}}, len(z)
		}
	}
	pctx, cancel := context.WithTimeout(ctx, s.o.PublishTimeout)
	defer cancel()
	if err := s.o.Publisher.Publish(pctx, wire.KindTelemetry, body); err != nil {
		s.log.Debug("telemetry batch not sent", "err", err)
		return nil, err
	}
	f := &inflight{first: batch.Records[0].GetSeq(), last: batch.Records[len(batch.Records)-1].GetSeq(),
		pending: make(map[uint64]bool, len(batch.Records)), sentAt: s.o.Now(), prio: prio, compressed: compressed}
	if compressed {
		s.stats.compressed.Add(1)
	}
	s.stats.bytes.Add(uint64(size))
	s.stats.plainBytes.Add(uint64(plain))
	for _, r := range batch.Records {
		f.pending[r.GetSeq()] = true
	}
	s.stats.batches.Add(1)
	s.stats.records.Add(uint64(len(batch.Records)))
	return f, nil
}

// handleAck deletes exactly the acknowledged seqs and retires the batches
// they complete.
func (s *Sender) handleAck(ctx context.Context, a *pb.TelemetryAck, flight []*inflight) []*inflight {
	if a.GetSpoolEpoch() != s.o.Spool.Epoch() {
		s.stats.badAcks.Add(1)
		s.log.Warn("ignoring telemetry ack for another spool epoch", "epoch", a.GetSpoolEpoch(), "ours", s.o.Spool.Epoch())
		return flight
	}
	var ranges []*pb.SeqRange
	for _, r := range a.GetStored() {
		if r.GetFirst() <= r.GetLast() {
			ranges = append(ranges, r)
		}
	}
	if len(ranges) == 0 {
		return flight
	}
	n, err := s.o.Spool.Delete(ctx, ranges)
	if err != nil {
		s.log.Error("cannot delete acknowledged records", "err", err)
		return flight
	}
	s.stats.acked.Add(uint64(n))
	keep := flight[:0]
	for _, f := range flight {
		for seq := range f.pending {
			for _, r := range ranges {
				if seq >= r.GetFirst() && seq <= r.GetLast() {
					delete(f.pending, seq)
					if f.compressed && s.zstd == zstdUnknown {
						s.zstd = zstdYes
						s.log.Debug("the controller reads compressed telemetry batches")
					}
					break
				}
			}
		}
		if len(f.pending) > 0 {
			keep = append(keep, f)
		}
	}
	return keep
}
