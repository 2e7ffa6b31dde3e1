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
)

// The ingest benchmark's load: publishers devices, each sending batches
// of records inference records, with at most window batches unanswered,
// as the agent's telemetry sender does (agent/telemetry, Window 4). The
// window matters: a burst of QoS 1 messages with no flow control
// overflows the broker's queue for a slow subscriber, and the broker drops
// what does not fit.
const (
	ingestPublishers = 100
	ingestBatches    = 100 // per publisher
	ingestRecords    = 50  // per batch
	ingestWindow     = 4
)

// ingestResult compares, per run, the broker's raw QoS 1 delivery rate to
// one subscriber with the controller's telemetry ingest rate (batches
// stored and acknowledged), with the same publishers and payloads.
type ingestResult struct {
	Broker       string
	Messages     int
	PayloadBytes int
	Raw          []float64 // messages/s
	Ingest       []float64 // batches/s
}

func (e *env) benchIngest(ctx context.Context, kind string) (ingestResult, error) {
	res := ingestResult{Broker: kind, Messages: ingestPublishers * ingestBatches}
	for run := range e.cfg.runs {
		raw, ing, size, err := e.ingestRun(ctx, kind, false, nil)
		if err != nil {
			return res, err
		}
		res.Raw = append(res.Raw, raw)
		res.Ingest = append(res.Ingest, ing)
		res.PayloadBytes = size
		e.log.Info("ingest", "broker", kind, "run", run+1, "raw_msgs_per_s", int(raw), "ingest_batches_per_s", int(ing), "ratio", fmt.Sprintf("%.2f", ing/raw))
	}
	return res, nil
}

// ingestRun measures both rates on a fresh broker and controller. With
// profiled, the controller runs under runtime/pprof with its CPU profiled
// during the ingest phase, and prof then gets the profiles' directory.
func (e *env) ingestRun(ctx context.Context, kind string, profiled bool, prof func(dir string)) (raw, ingest float64, size int, err error) {
	external := ""
	if kind == "mosquitto" {
		m, url, err := e.startMosquitto(ctx)
		if err != nil {
			return 0, 0, 0, err
		}
		defer m.Kill()
		external = url
	}
	c, err := e.startController(ctx, external, profiled)
	if err != nil {
		return 0, 0, 0, err
	}
	defer c.stop()

	ids := make([]string, ingestPublishers)
	payloads := make([][][]byte, ingestPublishers)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-ingest-%02d", i)
		payloads[i], err = telemetryPayloads(ids[i])
		if err != nil {
			return 0, 0, 0, err
		}
	}
	size = len(payloads[0][0])
	if raw, err = rawDelivery(ctx, c.broker, payloads); err != nil {
		return 0, 0, 0, fmt.Errorf("raw delivery: %w", err)
	}
	if profiled {
		_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR1)
	}
	ingest, err = controllerIngest(ctx, c, ids, payloads)
	if profiled {
		_ = syscall.Kill(c.p.Pid(), syscall.SIGUSR2)
		sleep(ctx, 2*time.Second)
		prof(c.dir)
	}
	if err != nil {
		return 0, 0, 0, fmt.Errorf("controller ingest: %w", err)
	}
	return raw, ingest, size, nil
}

// telemetryPayloads seals a device's batches, each with its own records
// (a spool epoch and rising sequence numbers), as an agent sends them.
func telemetryPayloads(id string) ([][]byte, error) {
	var epoch [16]byte
	rand.Read(epoch[:])
	now := time.Now()
	out := make([][]byte, ingestBatches)
	seq := uint64(0)
	for j := range out {
		b := &pb.TelemetryBatch{SpoolEpoch: hex.EncodeToString(epoch[:])}
		for range ingestRecords {
			seq++
			b.Records = append(b.Records, &pb.TelemetryRecord{Seq: seq, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
				Model: benchModel, Version: "1.0.0", AtUnixMs: now.UnixMilli(), LatencyUs: 120 + uint32(seq%50)}}})
		}
		p, err := wire.Seal(id, now, b)
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
	took, err := finish(ctx, start, done, errc, func() error {
		return fmt.Errorf("the subscriber got %d of %d messages", got.Load(), total)
	})
	if err != nil {
		return 0, err
	}
	return float64(total) / took.Seconds(), nil
}

// controllerIngest is the rate at which the controller stores and acks
// the same batches, published by as many devices (each says hello first
// and subscribes to its acks, as an agent does); an ack frees its
// device's window. It checks the controller's batch counter agrees.
func controllerIngest(ctx context.Context, c *ctl, ids []string, payloads [][][]byte) (float64, error) {
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
	for i, id := range ids {
		d, err := connect(ctx, c.broker, id)
		if err != nil {
			return 0, err
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
			return 0, err
		}
		hello, err := wire.Seal(id, time.Now(), &pb.Hello{Labels: map[string]string{"bench": "ingest"}, AgentVersion: "bench"})
		if err != nil {
			return 0, err
		}
		if err := wait(ctx, d.Publish(wire.Topic(id, wire.KindHello), 1, false, hello), 10*time.Second); err != nil {
			return 0, err
		}
	}
	base, err := c.metric(ctx, counter)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		errc <- publishAll(ctx, devs, payloads, func(i int) string { return wire.Topic(ids[i], wire.KindTelemetry) }, win)
	}()
	took, err := finish(ctx, start, done, errc, func() error {
		return fmt.Errorf("the controller acknowledged %d of %d batches", acked.Load(), total)
	})
	if err != nil {
		return 0, err
	}
	if n, err := c.metric(ctx, counter); err != nil || n-base < float64(total) {
		return 0, fmt.Errorf("acknowledged %d batches but the controller counts %v stored (%v)", total, n-base, err)
	}
	return float64(total) / took.Seconds(), nil
}

// finish waits for both the publishers (errc) and the receiving side
// (done), and returns the time from start until the last of them; late
// says what is missing when the receiving side is a minute late.
func finish(ctx context.Context, start time.Time, done <-chan struct{}, errc <-chan error, late func() error) (time.Duration, error) {
	published := false
	for {
		select {
		case <-done:
			took := time.Since(start)
			if !published {
				if err := <-errc; err != nil {
					return 0, err
				}
			}
			return took, nil
		case err := <-errc:
			if err != nil {
				return 0, err
			}
			published = true
			errc = nil
		case <-time.After(time.Minute):
			if published {
				return 0, late()
			}
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// ingestProfile is where the controller's CPU went during telemetry
// ingest.
type ingestProfile struct {
	Rate float64 // batches/s in the profiled run
	CPU  []string
}

// profileIngest runs the ingest benchmark once more on the embedded
// broker with the controller under runtime/pprof.
func (e *env) profileIngest(ctx context.Context) (*ingestProfile, error) {
	p := &ingestProfile{}
	_, rate, _, err := e.ingestRun(ctx, "embedded", true, func(dir string) {
		p.CPU = pprofTop(ctx, filepath.Join(dir, "cpu.prof"), "", 25)
	})
	p.Rate = rate
	return p, err
}
