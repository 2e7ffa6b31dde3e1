package telemetry

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/sync/errgroup"

	"github.com/edgefleet/edgefleet/controller/link"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// TestDelayedAck stores a device's batch while its next batch is already
// queued: the first ack waits for the next commit, and one ack then names
// both batches' seqs; a batch with nothing queued behind it is acked at
// once. Real broker, link and store.
func TestDelayedAck(t *testing.T) {
	url, _ := benchBroker(t)
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	l, err := link.New(link.Options{Broker: url, ClientID: "ctl", Handler: link.HandlerFunc(func(context.Context, link.Message) error { return nil })})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var g errgroup.Group
	t.Cleanup(func() { cancel(); _ = g.Wait() })
	g.Go(func() error { return l.Run(ctx) })
	<-l.Ready()
	in := New(Options{Store: st, Publisher: l})

	acks := make(chan *pb.TelemetryAck, 8)
	dev := benchClient(t, url, "dev")
	if tok := dev.Subscribe(wire.Topic("dev", wire.KindAck), 1, func(_ mqtt.Client, m mqtt.Message) {
		if env, err := wire.Open(m.Topic(), m.Payload()); err == nil {
			acks <- env.GetAck()
		}
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	batch := func(first uint64) Submission {
		s := Submission{DeviceID: "dev", Epoch: "e", Seen: time.Now(), Names: []store.ModelVersion{{Model: "m", Version: "1"}}}
		for seq := first; seq < first+3; seq++ {
			s.Inferences = append(s.Inferences, store.InferenceRow{Seq: seq, LatencyUS: 100})
		}
		return s
	}
	next := func() string {
		t.Helper()
		select {
		case a := <-acks:
			return format(a.GetStored())
		case <-time.After(10 * time.Second):
			t.Fatal("no ack")
			return ""
		}
	}

	// Batch 1 stored while batch 2 is queued: held.
	in.addQueued("dev", 1)
	in.commit(ctx, []Submission{batch(1)})
	if in.acks.Value() != 0 || in.delayed.Value() != 1 {
		t.Fatalf("%d acks published, %d delayed; want the first held", in.acks.Value(), in.delayed.Value())
	}
	// Batch 2 taken into the next group: its commit acks both.
	in.addQueued("dev", -1)
	in.commit(ctx, []Submission{batch(4)})
	if got := next(); got != "1-6" {
		t.Fatalf("ack %q, want both batches, 1-6", got)
	}
	// Nothing queued behind batch 3: acked at once.
	in.commit(ctx, []Submission{batch(7)})
	if got := next(); got != "7-9" || in.acks.Value() != 2 {
		t.Fatalf("ack %q (%d acks), want 7-9 at once", got, in.acks.Value())
	}
	s, err := st.TelemetryStats(ctx, "dev")
	if err != nil || s.Records != 9 || s.Distinct != 9 {
		t.Fatalf("stored %+v, %v; want 9 records once each", s, err)
	}
}
