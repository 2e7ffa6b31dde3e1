package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/controller/link"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// benchBroker runs an in-process mochi broker at its default settings.
func benchBroker(tb testing.TB) (string, *mochi.Server) {
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		tb.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "bench", Address: "127.0.0.1:0"})
	if err := srv.AddListener(l); err != nil {
		tb.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { srv.Close() })
	return "tcp://" + l.Address(), srv
}

func benchClient(tb testing.TB, url, id string) mqtt.Client {
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(id).SetCleanSession(true).SetOrderMatters(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		tb.Fatalf("connect %s: %v", id, tok.Error())
	}
	tb.Cleanup(func() { c.Disconnect(100) })
	return c
}

// benchBatches seals n telemetry batches of size inference records each,
// with seqs following on from one batch to the next, plain or compressed
// as an agent with the telemetry-zstd capability sends them.
func benchBatches(tb testing.TB, dev string, n, size int, zstd bool) [][]byte {
	enc, err := wire.NewBatchEncoder()
	if err != nil {
		tb.Fatal(err)
	}
	out := make([][]byte, n)
	seq := uint64(0)
	for i := range out {
		batch := &pb.TelemetryBatch{SpoolEpoch: "0123456789abcdef0123456789abcdef"}
		for j := range size {
			seq++
			rec := &pb.InferenceRecord{Model: "grid-anomaly", Version: "1.4.2", AtUnixMs: 1_790_000_000_000 + int64(seq)*7, LatencyUs: uint32(150 + j%90)}
			if seq%50 == 0 {
				rec.Error = "model timed out after 50ms"
			}
			batch.Records = append(batch.Records, &pb.TelemetryRecord{Seq: seq, Body: &pb.TelemetryRecord_Inference{Inference: rec}})
		}
		var body proto.Message = batch
		if zstd {
			z, err := enc.Compress(batch)
			if err != nil {
				tb.Fatal(err)
			}
			body = &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: z}}
		}
		p, err := wire.Seal(dev, time.Now(), body)
		if err != nil {
			tb.Fatal(err)
		}
		out[i] = p
	}
	return out
}

// BenchmarkIngestVsBroker compares, in one run, the broker's raw QoS 1
// delivery rate of telemetry batches with the controller's ingest rate.
//
// A fleet of agent-like paho clients publishes sealed batches of 256
// inference records, QoS 1, to an in-process mochi broker at its default
// settings, each with at most `window` batches unanswered (the agent's
// send window), so the broker never drops. broker: one subscriber only
// counts each batch and answers it at once (in-process). ingest: the
// controller's own path, controller/link (queue, wire.Open) into Ingest
// (group commit into SQLite, synchronous=FULL), and the agent's window
// moves only when the controller's ack comes back over the broker;
// ingest-noraw is the same without keeping the raw compressed batches
// (--telemetry-raw-retention 0); ingest-nostore the same with a store that
// keeps nothing (discard), for the bound.
// Reports records/s and the bytes on the wire per record.
func BenchmarkIngestVsBroker(b *testing.B) {
	const (
		size    = 256 // records per batch (spool.Queue's batch)
		window  = 4   // batches in flight per agent (the agent's default)
		devices = 64
	)
	for _, enc := range []string{"plain", "zstd"} {
		for _, mode := range []string{"broker", "ingest", "ingest-noraw", "ingest-nostore"} {
			if mode == "ingest-noraw" && enc == "plain" {
				continue // plain batches are never kept raw
			}
			b.Run(mode+"/"+enc, func(b *testing.B) {
				url, srv := benchBroker(b)
				per := (b.N + devices - 1) / devices
				payloads := make([][][]byte, devices)
				ids := make([]string, devices)
				for d := range devices {
					ids[d] = fmt.Sprintf("bench-%d", d)
					payloads[d] = benchBatches(b, ids[d], per, size, enc == "zstd")
				}
				rooms := map[string]chan struct{}{}
				for _, id := range ids {
					rooms[id] = make(chan struct{}, window)
				}
				var done atomic.Int64
				var ing *Ingest
				total := int64(per * devices)
				// all is closed by the last answer, so the clock stops then
				// without a polling loop taking CPU from the run.
				all := make(chan struct{})
				release := func(id string) {
					if done.Add(1) == total {
						close(all)
					}
					<-rooms[id]
				}
				ctx, cancel := context.WithCancel(context.Background())
				var g errgroup.Group
				b.Cleanup(func() { cancel(); _ = g.Wait() })
				switch mode {
				case "broker":
					sub := benchClient(b, url, "bench-ctl")
					tok := sub.Subscribe(wire.AllDevices(wire.KindTelemetry), 1, func(_ mqtt.Client, m mqtt.Message) {
						id, _, _ := wire.ParseTopic(m.Topic())
						release(id)
					})
					if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
						b.Fatal(tok.Error())
					}
				case "ingest", "ingest-noraw", "ingest-nostore":
					st, err := store.Open(context.Background(), filepath.Join(b.TempDir(), store.FileName))
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { st.Close() })
					var sto Store = st
					if mode == "ingest-nostore" {
						sto = discard{}
					}
					var in *Ingest
					handler := link.HandlerFunc(func(ctx context.Context, m link.Message) error {
						return in.Handle(ctx, m, nil)
					})
					l, err := link.New(link.Options{Broker: url, ClientID: "bench-ctl", Handler: handler, LazyTelemetry: true})
					if err != nil {
						b.Fatal(err)
					}
					in = New(Options{Store: sto, Publisher: l, KeepRaw: mode == "ingest"})
					ing = in
					g.Go(func() error { return l.Run(ctx) })
					g.Go(func() error { return in.Run(ctx) })
					<-l.Ready()
				}
				agents := make([]mqtt.Client, devices)
				for d, id := range ids {
					agents[d] = benchClient(b, url, id)
					if mode != "broker" {
						// An ack may cover several batches: retire every one
						// whose last seq it reaches (seqs go up by size).
						var retired uint64
						tok := agents[d].Subscribe(wire.Topic(id, wire.KindAck), 1, func(_ mqtt.Client, m mqtt.Message) {
							env, err := wire.Open(m.Topic(), m.Payload())
							if err != nil {
								return
							}
							var top uint64
							for _, r := range env.GetAck().GetStored() {
								top = max(top, r.GetLast())
							}
							for ; (retired+1)*size <= top; retired++ {
								release(id)
							}
						})
						if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
							b.Fatal(tok.Error())
						}
					}
				}
				var bytes atomic.Int64
				var ru0, ru1 syscall.Rusage
				_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
				b.ResetTimer()
				var wg sync.WaitGroup
				for d, id := range ids {
					wg.Go(func() {
						topic := wire.Topic(id, wire.KindTelemetry)
						for _, p := range payloads[d] {
							rooms[id] <- struct{}{}
							agents[d].Publish(topic, 1, false, p)
							bytes.Add(int64(len(p)))
						}
					})
				}
				wg.Wait()
				deadline := time.After(2 * time.Minute)
				tick := time.NewTicker(10 * time.Millisecond)
				defer tick.Stop()
			wait:
				for {
					select {
					case <-all:
						break wait
					case <-tick.C:
						if d := srv.Info.Clone(); d.MessagesDropped > 0 || d.InflightDropped > 0 {
							b.Fatalf("the broker dropped %d messages and %d in flight: a window this wide is too much for it here", d.MessagesDropped, d.InflightDropped)
						}
					case <-deadline:
						b.Fatalf("%d of %d batches answered after 2 minutes", done.Load(), total)
					}
				}
				b.StopTimer()
				_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
				cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
				// CPU of the whole process (broker, clients and controller
				// alike) per batch, and the cores it kept busy: whether a
				// rate is bound by CPU or by waiting.
				b.ReportMetric(float64(cpu.Microseconds())/float64(total), "cpu-us/batch")
				b.ReportMetric(cpu.Seconds()/b.Elapsed().Seconds(), "cores")
				b.ReportMetric(float64(total*size)/b.Elapsed().Seconds(), "records/s")
				b.ReportMetric(float64(bytes.Load())/float64(total*size), "wire-B/record")
				b.ReportMetric(0, "ns/op")
				if ing != nil {
					b.ReportMetric(float64(ing.batches.Value())/float64(max(ing.groups.Value(), 1)), "batches/commit")
					b.ReportMetric(ing.commitLatency.Mean()*1e3, "ms/commit")
					b.ReportMetric(float64(ing.acks.Value())/float64(max(ing.batches.Value(), 1)), "acks/batch")
				}
			})
		}
	}
}
