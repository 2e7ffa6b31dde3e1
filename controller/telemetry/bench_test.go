package telemetry

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// benchBroker runs an in-process mochi broker at its default settings.
func benchBroker(b *testing.B) string {
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		b.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "bench", Address: "127.0.0.1:0"})
	if err := srv.AddListener(l); err != nil {
		b.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	return "tcp://" + l.Address()
}

func benchClient(b *testing.B, url, id string) mqtt.Client {
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(id).SetCleanSession(true).SetOrderMatters(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		b.Fatalf("connect %s: %v", id, tok.Error())
	}
	b.Cleanup(func() { c.Disconnect(100) })
	return c
}

// pahoPublisher publishes acks through a paho client, as controller/link does.
type pahoPublisher struct{ c mqtt.Client }

func (p pahoPublisher) PublishAsync(topic string, payload []byte, retained bool, done func(error)) {
	tok := p.c.Publish(topic, 1, retained, payload)
	go func() { tok.Wait(); done(tok.Error()) }()
}

// benchBatches seals n telemetry batches of size inference records each,
// with seqs following on from one batch to the next.
func benchBatches(b *testing.B, dev string, n, size int) [][]byte {
	out := make([][]byte, n)
	seq := uint64(0)
	for i := range out {
		batch := &pb.TelemetryBatch{SpoolEpoch: "0123456789abcdef0123456789abcdef"}
		for j := range size {
			seq++
			batch.Records = append(batch.Records, &pb.TelemetryRecord{Seq: seq, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
				Model: "grid-anomaly", Version: "1.4.2", AtUnixMs: 1_790_000_000_000 + int64(seq), LatencyUs: uint32(150 + j%90)}}})
		}
		p, err := wire.Seal(dev, time.Now(), batch)
		if err != nil {
			b.Fatal(err)
		}
		out[i] = p
	}
	return out
}

// BenchmarkIngestVsBroker compares, in one run, the broker's raw QoS 1
// delivery rate of telemetry batches (a subscriber that only counts them)
// with the controller's ingest (decode, one SQLite transaction per batch,
// ack published after commit). Both publish from one agent-like client
// with the same send window, so neither can outrun the subscriber and
// make the broker drop. It also reports the bytes on the wire per
// inference record (sealed envelope, no compression).
func BenchmarkIngestVsBroker(b *testing.B) {
	const (
		size   = 256 // records per batch (spool.Queue's batch)
		window = 8   // batches in flight
		dev    = "bench-1"
	)
	for _, mode := range []string{"broker", "ingest"} {
		b.Run(mode, func(b *testing.B) {
			url := benchBroker(b)
			payloads := benchBatches(b, dev, b.N, size)
			var handle func(topic string, payload []byte) error
			switch mode {
			case "broker":
				handle = func(string, []byte) error { return nil }
			case "ingest":
				st, err := store.Open(context.Background(), filepath.Join(b.TempDir(), store.FileName))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { st.Close() })
				acker := benchClient(b, url, "bench-ctl-acks")
				in := New(Options{Store: st, Publisher: pahoPublisher{acker}})
				handle = func(topic string, payload []byte) error {
					env, err := wire.Open(topic, payload)
					if err != nil {
						return err
					}
					return in.Batch(context.Background(), env.GetDeviceId(), time.Now(), env.GetTelemetry())
				}
			}
			var done atomic.Int64
			var failed atomic.Value
			room := make(chan struct{}, window)
			sub := benchClient(b, url, "bench-ctl")
			tok := sub.Subscribe(wire.AllDevices(wire.KindTelemetry), 1, func(_ mqtt.Client, m mqtt.Message) {
				if err := handle(m.Topic(), m.Payload()); err != nil {
					failed.Store(err)
				}
				done.Add(1)
				<-room
			})
			if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				b.Fatal(tok.Error())
			}
			pub := benchClient(b, url, "bench-agent")
			topic := wire.Topic(dev, wire.KindTelemetry)
			var bytes int
			b.ResetTimer()
			for _, p := range payloads {
				room <- struct{}{}
				pub.Publish(topic, 1, false, p)
				bytes += len(p)
			}
			for done.Load() < int64(b.N) {
				if err, _ := failed.Load().(error); err != nil {
					b.Fatal(err)
				}
				time.Sleep(50 * time.Microsecond)
			}
			b.StopTimer()
			if err, _ := failed.Load().(error); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N*size)/b.Elapsed().Seconds(), "records/s")
			b.ReportMetric(float64(bytes)/float64(b.N*size), "wire-B/record")
		})
	}
}
