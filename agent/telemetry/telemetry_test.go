package telemetry

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/agent/link"
	"github.com/edgefleet/edgefleet/agent/spool"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

const dev = "dev-1"

// rig is a real spool, a real link to a real broker, a sender between
// them, and a controller client on the broker.
type rig struct {
	t      *testing.T
	spool  *spool.SQLite
	sender *Sender
	ctl    *brokertest.Controller
	flaky  *flaky
}

func newRig(t *testing.T, o Options) *rig {
	t.Helper()
	return newRigFlaky(t, o, nil)
}

// flaky fails the first n publishes, as a broker that times out would,
// while the connection stays up.
type flaky struct {
	Publisher
	mu sync.Mutex
	n  int
}

func (f *flaky) Publish(ctx context.Context, kind wire.Kind, body proto.Message) error {
	f.mu.Lock()
	fail := f.n > 0
	f.n--
	f.mu.Unlock()
	if fail {
		return errors.New("publish timed out (test)")
	}
	return f.Publisher.Publish(ctx, kind, body)
}

func newRigFlaky(t *testing.T, o Options, fl *flaky) *rig {
	t.Helper()
	sp, err := spool.OpenSQLite(t.Context(), filepath.Join(t.TempDir(), "spool.db"), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sp.Close() })
	b := brokertest.Start(t)
	r := &rig{t: t, spool: sp, ctl: b.Controller(t), flaky: fl}
	var l *link.Link
	l, err = link.New(link.Options{Broker: b.URL(), DeviceID: dev, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Handle: func(k wire.Kind, env *pb.Envelope) {
			if k == wire.KindAck {
				r.sender.Ack(env.GetAck())
			}
		},
		OnConnect:    func(context.Context) { r.sender.Connected() },
		OnDisconnect: func() { r.sender.Disconnected() },
	})
	if err != nil {
		t.Fatal(err)
	}
	o.Spool, o.Publisher = sp, l
	if r.flaky != nil {
		r.flaky.Publisher = l
		o.Publisher = r.flaky
	}
	r.sender = New(o)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { l.Run(ctx) })
	wg.Go(func() { r.sender.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	return r
}

func (r *rig) append(n int, errText string) {
	r.t.Helper()
	recs := make([]*pb.TelemetryRecord, n)
	for i := range recs {
		recs[i] = &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
			Model: "m", Version: "1.0.0", AtUnixMs: int64(i), LatencyUs: 10, Error: errText}}}
	}
	if err := r.spool.Append(r.t.Context(), recs); err != nil {
		r.t.Fatal(err)
	}
	r.sender.Poke()
}

func (r *rig) depth() uint64 {
	st, err := r.spool.Stats(r.t.Context())
	if err != nil {
		r.t.Fatal(err)
	}
	return st.Depth
}

// batches returns the telemetry batches received so far.
func (r *rig) batches() []*pb.TelemetryBatch {
	var out []*pb.TelemetryBatch
	for _, m := range r.ctl.Messages() {
		if m.Env != nil && m.Env.GetTelemetry() != nil {
			out = append(out, m.Env.GetTelemetry())
		}
	}
	return out
}

func (r *rig) waitBatches(n int) []*pb.TelemetryBatch {
	r.t.Helper()
	r.ctl.WaitFor(10*time.Second, fmt.Sprintf("%d batches", n), func(brokertest.Message) bool { return len(r.batches()) >= n })
	return r.batches()
}

func (r *rig) ack(epoch string, ranges ...*pb.SeqRange) {
	r.ctl.Send(dev, wire.KindAck, &pb.TelemetryAck{SpoolEpoch: epoch, Stored: ranges})
}

func ackAll(b *pb.TelemetryBatch) *pb.SeqRange {
	return &pb.SeqRange{First: b.GetRecords()[0].GetSeq(), Last: b.GetRecords()[len(b.GetRecords())-1].GetSeq()}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func seqSpan(b *pb.TelemetryBatch) string {
	return fmt.Sprintf("%d-%d", b.GetRecords()[0].GetSeq(), b.GetRecords()[len(b.GetRecords())-1].GetSeq())
}

func TestSendAckDelete(t *testing.T) {
	r := newRig(t, Options{BatchSize: 500, Window: 2, AckTimeout: time.Minute})
	r.append(1200, "")
	got := r.waitBatches(2)
	time.Sleep(100 * time.Millisecond)
	// The window holds two batches until an ack frees a place.
	if n := len(r.batches()); n != 2 {
		t.Fatalf("%d batches in flight with a window of 2", n)
	}
	if seqSpan(got[0]) != "1-500" || seqSpan(got[1]) != "501-1000" || got[0].GetSpoolEpoch() != r.spool.Epoch() {
		t.Fatalf("batches %s, %s epoch %q", seqSpan(got[0]), seqSpan(got[1]), got[0].GetSpoolEpoch())
	}
	r.ack(r.spool.Epoch(), ackAll(got[0]))
	got = r.waitBatches(3)
	if seqSpan(got[2]) != "1001-1200" {
		t.Fatalf("third batch %s", seqSpan(got[2]))
	}
	waitUntil(t, "first ack applied", func() bool { return r.depth() == 700 })
	r.ack(r.spool.Epoch(), ackAll(got[1]), ackAll(got[2]))
	waitUntil(t, "spool empty", func() bool { return r.depth() == 0 && r.sender.Stats().Acked == 1200 })
	if st := r.sender.Stats(); st.Batches != 3 || st.Records != 1200 || st.Acked != 1200 || st.Resent != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestResendAfterTimeoutOnlyUnacked(t *testing.T) {
	r := newRig(t, Options{BatchSize: 10, Window: 1, AckTimeout: 300 * time.Millisecond, Poll: 20 * time.Millisecond})
	r.append(10, "")
	first := r.waitBatches(1)[0]
	// The controller stored only part of it (and says so).
	r.ack(r.spool.Epoch(), &pb.SeqRange{First: 1, Last: 4}, &pb.SeqRange{First: 9, Last: 9})
	waitUntil(t, "partial ack", func() bool { return r.depth() == 5 })
	again := r.waitBatches(2)[1]
	var seqs []uint64
	for _, rec := range again.GetRecords() {
		seqs = append(seqs, rec.GetSeq())
	}
	if fmt.Sprint(seqs) != "[5 6 7 8 10]" || len(first.GetRecords()) != 10 {
		t.Fatalf("resent %v, want exactly the unacknowledged [5 6 7 8 10]", seqs)
	}
	waitUntil(t, "resend counted", func() bool { return r.sender.Stats().Resent >= 1 })
	r.ack(r.spool.Epoch(), &pb.SeqRange{First: 1, Last: 10})
	waitUntil(t, "spool empty", func() bool { return r.depth() == 0 })
}

func TestReconnectResendsUnacked(t *testing.T) {
	r := newRig(t, Options{BatchSize: 100, Window: 4, AckTimeout: time.Minute})
	r.append(150, "")
	r.waitBatches(2)
	// An ack for another epoch (an old spool file) changes nothing.
	r.ack("someone-elses-epoch", &pb.SeqRange{First: 1, Last: math.MaxUint64})
	waitUntil(t, "bad ack seen", func() bool { return r.sender.Stats().BadAcks == 1 })
	if r.depth() != 150 {
		t.Fatalf("a foreign-epoch ack deleted records: depth %d", r.depth())
	}
	// A new connection: its acks are unknown, so everything goes again.
	r.sender.Disconnected()
	r.sender.Connected()
	got := r.waitBatches(4)
	if seqSpan(got[2]) != "1-100" || seqSpan(got[3]) != "101-150" {
		t.Fatalf("after reconnect sent %s, %s", seqSpan(got[2]), seqSpan(got[3]))
	}
}

func TestBatchesStayUnderPayloadCap(t *testing.T) {
	r := newRig(t, Options{BatchSize: 500, Window: 8, AckTimeout: time.Minute})
	big := strings.Repeat("e", 2000) // 500 of these are ~1 MB, over the cap
	r.append(500, big)
	r.ctl.WaitFor(10*time.Second, "all records", func(brokertest.Message) bool {
		n := 0
		for _, b := range r.batches() {
			n += len(b.GetRecords())
		}
		return n >= 500
	})
	for _, m := range r.ctl.Messages() {
		if len(m.Raw) > wire.MaxPayload {
			t.Fatalf("payload of %d bytes", len(m.Raw))
		}
	}
	if n := len(r.batches()); n < 4 {
		t.Fatalf("%d batches for ~1 MB of records", n)
	}
}

func TestPublishFailureWhileConnectedIsRetried(t *testing.T) {
	r := newRigFlaky(t, Options{BatchSize: 10, Window: 2, AckTimeout: time.Minute, Poll: 20 * time.Millisecond}, &flaky{n: 2})
	r.append(15, "")
	got := r.waitBatches(2)
	if seqSpan(got[0]) != "1-10" || seqSpan(got[1]) != "11-15" {
		t.Fatalf("after failed publishes sent %s, %s", seqSpan(got[0]), seqSpan(got[1]))
	}
	r.ack(r.spool.Epoch(), ackAll(got[0]), ackAll(got[1]))
	waitUntil(t, "spool empty", func() bool { return r.depth() == 0 })
}

func TestEventsFirstAfterReconnect(t *testing.T) {
	r := newRig(t, Options{BatchSize: 100, Window: 4, AckTimeout: time.Minute})
	event := func(gen uint64) *pb.TelemetryRecord {
		return &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Event{Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_ROLLED_BACK, Generation: gen}}}
	}
	var recs []*pb.TelemetryRecord
	for i := 1; i <= 152; i++ {
		rec := &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{Model: "m", Version: "1.0.0", LatencyUs: 10}}}
		if i == 51 || i == 152 {
			rec = event(uint64(i))
		}
		recs = append(recs, rec)
	}
	must(t, r.spool.Append(t.Context(), recs))
	r.sender.Poke()
	// The first connection may come up before or after the append, so
	// its order is not checked; wait until it sent every record.
	sentAll := func(bs []*pb.TelemetryBatch) bool {
		seen := map[uint64]bool{}
		for _, b := range bs {
			for _, seq := range batchSeqs(b) {
				seen[seq] = true
			}
		}
		return len(seen) == 152
	}
	waitUntil(t, "all records sent once", func() bool { return sentAll(r.batches()) })
	n := len(r.batches())
	r.sender.Disconnected()
	r.sender.Connected()
	waitUntil(t, "all records sent again", func() bool { return sentAll(r.batches()[n:]) })
	got := r.batches()[n:]
	if s := fmt.Sprint(batchSeqs(got[0])); s != "[51 152]" {
		t.Fatalf("first batch after reconnect has %s, want the events [51 152]", s)
	}
	// The in-order pass leaves the events out: each record once per connection.
	seen := map[uint64]int{}
	for _, b := range got {
		for _, seq := range batchSeqs(b) {
			seen[seq]++
		}
	}
	for seq := uint64(1); seq <= 152; seq++ {
		if seen[seq] != 1 {
			t.Fatalf("after reconnect seq %d sent %d times, want once", seq, seen[seq])
		}
	}
	// Acks of the events batch and the rest delete everything.
	for _, b := range got {
		r.ack(r.spool.Epoch(), ackRanges(b)...)
	}
	waitUntil(t, "spool empty", func() bool { return r.depth() == 0 })
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func batchSeqs(b *pb.TelemetryBatch) []uint64 {
	out := make([]uint64, 0, len(b.GetRecords()))
	for _, r := range b.GetRecords() {
		out = append(out, r.GetSeq())
	}
	return out
}

// ackRanges names exactly the seqs of b (a batch may skip seqs).
func ackRanges(b *pb.TelemetryBatch) []*pb.SeqRange {
	var out []*pb.SeqRange
	for _, seq := range batchSeqs(b) {
		if n := len(out); n > 0 && out[n-1].Last+1 == seq {
			out[n-1].Last = seq
			continue
		}
		out = append(out, &pb.SeqRange{First: seq, Last: seq})
	}
	return out
}
