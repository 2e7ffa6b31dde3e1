package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// The ingest benchmark's load: publishers devices, each sending batches
// of records inference records, with at most window batches unanswered,
// as the agent's telemetry sender does (agent/telemetry: Window 4; 256
// records is spool.Queue's batch, the size controller/telemetry's own
// BenchmarkIngestVsBroker uses, so the two measure the same thing). The
// window matters: a burst of QoS 1 messages with no flow control
// overflows the broker's queue for a slow subscriber, and the broker drops
// what does not fit.
const (
	ingestPublishers = 50
	ingestBatches    = 240 // per publisher: phases of seconds, not a burst
	ingestRecords    = 256 // per batch
	ingestWindow     = 4
	// ingestMaxPhase caps one phase: a slow controller is measured over
	// what it acknowledged in this time rather than holding up make bench.
	ingestMaxPhase = 30 * time.Second
)

// ingestEncodings are the two ways an agent may send a batch: a plain
// TelemetryBatch, or zstd-compressed (Envelope.telemetry_zstd).
var ingestEncodings = []string{"plain", "zstd"}

// ingestResult compares, per run, the broker's raw QoS 1 delivery rate to
// one subscriber with the controller's telemetry ingest rate (batches
// stored and acknowledged), with the same publishers and payloads.
type ingestResult struct {
	Broker, Encoding string
	Messages         int // batches per phase
	PayloadBytes     int // of one batch, sealed
	// Raw is the mean of RawBefore and RawAfter: the raw phases run just
	// before and just after the ingest phase, so a change in the machine's
	// other load during a run weighs on both sides alike.
	Raw                 []float64 // records/s
	RawBefore, RawAfter []float64 // records/s
	Ingest              []float64 // records/s
	// Capped counts the runs whose ingest phase hit ingestMaxPhase (their
	// rate is over what was acknowledged by then).
	Capped int
}

func (e *env) benchIngest(ctx context.Context, kind, encoding string) (ingestResult, error) {
	res := ingestResult{Broker: kind, Encoding: encoding, Messages: ingestPublishers * ingestBatches}
	for run := range e.cfg.runs {
		m, err := e.ingestRun(ctx, kind, encoding, false, nil)
		if err != nil {
			return res, err
		}
		res.Raw = append(res.Raw, (m.rawBefore+m.rawAfter)/2)
		res.RawBefore, res.RawAfter = append(res.RawBefore, m.rawBefore), append(res.RawAfter, m.rawAfter)
		res.Ingest = append(res.Ingest, m.ingest)
		res.PayloadBytes = m.size
		if m.capped {
			res.Capped++
		}
		raw := (m.rawBefore + m.rawAfter) / 2
		e.log.Info("ingest", "broker", kind, "encoding", encoding, "run", run+1, "raw_before_records_per_s", int(m.rawBefore),
			"ingest_records_per_s", int(m.ingest), "raw_after_records_per_s", int(m.rawAfter), "ratio", fmt.Sprintf("%.2f", m.ingest/raw), "capped", m.capped)
	}
	return res, nil
}

// ingestMeasure is one run's two rates, in records per second.
type ingestMeasure struct {
	rawBefore, ingest, rawAfter float64
	size                        int
	capped                      bool
}

// ingestRun measures both rates on a fresh broker and controller. With
// profiled, the controller runs under runtime/pprof with its CPU profiled
// during the ingest phase, and prof then gets the profiles' directory.
func (e *env) ingestRun(ctx context.Context, kind, encoding string, profiled bool, prof func(dir string)) (m ingestMeasure, err error) {
	external := ""
	if kind == "mosquitto" {
		mq, url, err := e.startMosquitto(ctx)
		if err != nil {
			return m, err
		}
		defer mq.Kill()
		external = url
	}
	c, err := e.startController(ctx, external, profiled)
	if err != nil {
		return m, err
	}
	defer c.stop()

	ids := make([]string, ingestPublishers)
	payloads := make([][][]byte, ingestPublishers)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-ingest-%02d", i)
		payloads[i], err = telemetryPayloads(ids[i], encoding == "zstd")
		if err != nil {
			return m, err
		}
	}
	m.size = len(payloads[0][0])
	if m.rawBefore, err = rawDelivery(ctx, c.broker, payloads); err != nil {
		return m, fmt.Errorf("raw delivery: %w", err)
	}
	if profiled {
		_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR1)
	}
	m.ingest, m.capped, err = controllerIngest(ctx, c, ids, payloads, encoding == "zstd")
	if profiled {
		_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR2)
		sleep(ctx, 2*time.Second)
		prof(c.dir)
	}
	if err != nil {
		return m, fmt.Errorf("controller ingest: %w", err)
	}
	if m.rawAfter, err = rawDelivery(ctx, c.broker, payloads); err != nil {
		return m, fmt.Errorf("raw delivery after ingest: %w", err)
	}
	return m, nil
}

// telemetryPayloads seals a device's batches, each with its own records
// (a spool epoch and rising sequence numbers), as an agent sends them:
// plain or zstd-compressed.
func telemetryPayloads(id string, compress bool) ([][]byte, error) {
	var epoch [16]byte
	rand.Read(epoch[:])
	enc, err := wire.NewBatchEncoder()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	out := make([][]byte, ingestBatches)
	seq := uint64(0)
	for j := range out {
		b := &pb.TelemetryBatch{SpoolEpoch: hex.EncodeToString(epoch[:])}
		for k := range ingestRecords {
			seq++
			rec := &pb.InferenceRecord{Model: benchModel, Version: "1.0.0", AtUnixMs: now.UnixMilli() + int64(seq), LatencyUs: 120 + uint32(k%90)}
			if seq%50 == 0 {
				rec.Error = "model timed out after 50ms"
			}
			b.Records = append(b.Records, &pb.TelemetryRecord{Seq: seq, Body: &pb.TelemetryRecord_Inference{Inference: rec}})
		}
		var body proto.Message = b
		if compress {
			z, err := enc.Compress(b)
			if err != nil {
				return nil, err
			}
			body = &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: z}}
		}
		p, err := wire.Seal(id, now, body)
		if err != nil {
			return nil, err
		}
		out[j] = p
	}
	return out, nil
}

func connect(ctx context.Context, broker, id string) (mqtt.Client, error) {
	opts := mqtt.NewClientOptions().AddBroker(broker).SetClientID(id).SetCleanSession(true).
		SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).SetOrderMatters(false).SetWriteTimeout(30 * time.Second)
	c := mqtt.NewClient(opts)
	if err := wait(ctx, c.Connect(), 10*time.Second); err != nil {
		return nil, fmt.Errorf("connect %s to %s: %w", id, broker, err)
	}
	return c, nil
}

func wait(ctx context.Context, t mqtt.Token, timeout time.Duration) error {
	tm := time.NewTimer(timeout)
	defer tm.Stop()
	select {
	case <-t.Done():
		return t.Error()
	case <-tm.C:
		return errors.New("timed out")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// publishAll publishes every payload of client i on topic(i), QoS 1,
// from one goroutine per client, never more than ingestWindow ahead of
// what answered(i) has released.
func publishAll(ctx context.Context, clients []mqtt.Client, payloads [][][]byte, topic func(i int) string, window []chan struct{}) error {
	g, gctx := errgroup.WithContext(ctx)
	for i, c := range clients {
		g.Go(func() error {
			for _, p := range payloads[i] {
				select {
				case window[i] <- struct{}{}:
				case <-gctx.Done():
					return gctx.Err()
				case <-time.After(2 * time.Minute):
					return fmt.Errorf("publisher %d: no answer for 2 minutes", i)
				}
				if err := wait(gctx, c.Publish(topic(i), 1, false, p), time.Minute); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return g.Wait()
}

// windows returns one flow-control window per publisher.
func windows(n int) []chan struct{} {
	w := make([]chan struct{}, n)
	for i := range w {
		w[i] = make(chan struct{}, ingestWindow)
	}
	return w
}

// release frees n places of a window.
func release(w chan struct{}, n int) {
	for range n {
		select {
		case <-w:
		default:
		}
	}
}

// rawDelivery is the broker's rate of delivering QoS 1 messages from the
// publishers to one subscriber that does nothing with them; a message
// received frees its publisher's window.
func rawDelivery(ctx context.Context, broker string, payloads [][][]byte) (float64, error) {
	total := int64(0)
	for _, p := range payloads {
		total += int64(len(p))
	}
	win := windows(len(payloads))
	sub, err := connect(ctx, broker, "bench-raw-subscriber")
	if err != nil {
		return 0, err
	}
	defer sub.Disconnect(100)
	var got atomic.Int64
	done := make(chan struct{})
	if err := wait(ctx, sub.Subscribe("bench/raw/#", 1, func(_ mqtt.Client, m mqtt.Message) {
		var i int
		if _, err := fmt.Sscanf(m.Topic(), "bench/raw/%d", &i); err == nil && i >= 0 && i < len(win) {
			release(win[i], 1)
		}
		if got.Add(1) == total {
			close(done)
		}
	}), 10*time.Second); err != nil {
		return 0, err
	}
	pubs := make([]mqtt.Client, len(payloads))
	for i := range pubs {
		if pubs[i], err = connect(ctx, broker, fmt.Sprintf("bench-raw-%02d", i)); err != nil {
			return 0, err
		}
		defer pubs[i].Disconnect(100)
	}
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		errc <- publishAll(ctx, pubs, payloads, func(i int) string { return fmt.Sprintf("bench/raw/%02d", i) }, win)
	}()
	took, _, err := finish(ctx, start, done, errc, 0, func() error {
		return fmt.Errorf("the subscriber got %d of %d messages", got.Load(), total)
	})
	if err != nil {
		return 0, err
	}
	return float64(total*ingestRecords) / took.Seconds(), nil
}

// controllerIngest is the rate, in records per second, at which the
// controller stores and acks the same batches, published by as many
// devices (each says hello first and subscribes to its acks, as an agent
// does); an ack frees its device's window. It checks the controller's
// batch counter agrees. After ingestMaxPhase it stops the publishers and
// returns the rate of what was acknowledged until then, with capped set.
func controllerIngest(ctx context.Context, c *ctl, ids []string, payloads [][][]byte, compressed bool) (rate float64, capped bool, err error) {
	const counter = "edgefleet_controller_telemetry_batches_total"
	total := int64(0)
	for _, p := range payloads {
		total += int64(len(p))
	}
	win := windows(len(ids))
	var acked atomic.Int64 // batches, from the records acknowledged
	done := make(chan struct{})
	var once sync.Once
	devs := make([]mqtt.Client, len(ids))
	var caps []string
	if compressed {
		caps = []string{wire.CapabilityTelemetryZstd}
	}
	for i, id := range ids {
		d, err := connect(ctx, c.broker, id)
		if err != nil {
			return 0, false, err
		}
		defer d.Disconnect(100)
		devs[i] = d
		var records int64
		var mu sync.Mutex
		onAck := func(_ mqtt.Client, m mqtt.Message) {
			env, err := wire.Open(m.Topic(), m.Payload())
			if err != nil {
				return
			}
			n := int64(0)
			for _, r := range env.GetAck().GetStored() {
				n += int64(r.GetLast() - r.GetFirst() + 1)
			}
			mu.Lock()
			before := records / ingestRecords
			records += n
			batches := records/ingestRecords - before
			mu.Unlock()
			release(win[i], int(batches))
			if acked.Add(batches) >= total {
				once.Do(func() { close(done) })
			}
		}
		if err := wait(ctx, d.Subscribe(wire.Topic(id, wire.KindAck), 1, onAck), 10*time.Second); err != nil {
			return 0, false, err
		}
		hello, err := wire.Seal(id, time.Now(), &pb.Hello{Labels: map[string]string{"bench": "ingest"}, AgentVersion: "bench", Capabilities: caps})
		if err != nil {
			return 0, false, err
		}
		if err := wait(ctx, d.Publish(wire.Topic(id, wire.KindHello), 1, false, hello), 10*time.Second); err != nil {
			return 0, false, err
		}
	}
	base, err := c.metric(ctx, counter)
	if err != nil {
		return 0, false, err
	}
	pctx, stop := context.WithCancel(ctx)
	defer stop()
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		errc <- publishAll(pctx, devs, payloads, func(i int) string { return wire.Topic(ids[i], wire.KindTelemetry) }, win)
	}()
	took, capped, err := finish(ctx, start, done, errc, ingestMaxPhase, func() error {
		return fmt.Errorf("the controller acknowledged %d of %d batches", acked.Load(), total)
	})
	if err != nil {
		return 0, false, err
	}
	got := acked.Load()
	if capped {
		stop()
	}
	if n, err := c.metric(ctx, counter); err != nil || n-base < float64(got) {
		return 0, false, fmt.Errorf("acknowledged %d batches but the controller counts %v stored (%v)", got, n-base, err)
	}
	return float64(got*ingestRecords) / took.Seconds(), capped, nil
}

// finish waits for both the publishers (errc) and the receiving side
// (done), and returns the time from start until the last of them; late
// says what is missing when the receiving side is a minute late. With a
// limit, it returns at start+limit at the latest, with capped set.
func finish(ctx context.Context, start time.Time, done <-chan struct{}, errc <-chan error, limit time.Duration, late func() error) (took time.Duration, capped bool, err error) {
	published := false
	var limitC <-chan time.Time
	if limit > 0 {
		t := time.NewTimer(limit)
		defer t.Stop()
		limitC = t.C
	}
	for {
		select {
		case <-done:
			took := time.Since(start)
			if !published {
				if err := <-errc; err != nil {
					return 0, false, err
				}
			}
			return took, false, nil
		case err := <-errc:
			if err != nil {
				return 0, false, err
			}
			published = true
			errc = nil
		case <-limitC:
			return time.Since(start), true, nil
		case <-time.After(time.Minute):
			if published {
				return 0, false, late()
			}
		case <-ctx.Done():
			return 0, false, ctx.Err()
		}
	}
}

// ingestProfile is where the controller's CPU went during telemetry
// ingest.
type ingestProfile struct {
	Rate float64 // records/s in the profiled run
	CPU  []string
}

// profileIngest runs the ingest benchmark once more on the embedded
// broker, plain batches, with the controller under runtime/pprof.
func (e *env) profileIngest(ctx context.Context) (*ingestProfile, error) {
	p := &ingestProfile{}
	m, err := e.ingestRun(ctx, "embedded", "plain", true, func(dir string) {
		p.CPU = pprofTop(ctx, filepath.Join(dir, "cpu.prof"), "", 30, true)
	})
	p.Rate = m.ingest
	return p, err
}
