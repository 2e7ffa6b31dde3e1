package inventory

import (
	"context"
	"fmt"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// benchMessages is what a fleet of devices says while a model rolls out:
// each device's hello, presence and state, then its deployment events and
// the states that follow them, devices interleaved as on the wire.
func benchMessages(n, devices int) []Update {
	at := time.Now()
	st := func(gen uint64) *pb.ReportedState {
		return &pb.ReportedState{Health: pb.Health_HEALTH_OK, DesiredGeneration: gen, AgentVersion: "1.0.0", SpoolDepth: 12,
			Slots: []*pb.SlotState{{Slot: "default", Active: &pb.ModelRef{Name: "fraud-score", Version: "1.0.0"}}}}
	}
	steps := []func(id string) Update{
		func(id string) Update {
			return Update{DeviceID: id, At: at, Hello: &pb.Hello{AgentVersion: "1.0.0", Os: "linux", Arch: "arm64",
				Labels: map[string]string{"region": "eu", "fleet": "bench"}, State: st(0)}}
		},
		func(id string) Update { return Update{DeviceID: id, At: at, Presence: &pb.Presence{Online: true}} },
		func(id string) Update { return Update{DeviceID: id, At: at, State: st(0)} },
		func(id string) Update {
			return Update{DeviceID: id, At: at, Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_DOWNLOADING, Generation: 1, Slot: "default"}}
		},
		func(id string) Update {
			return Update{DeviceID: id, At: at, Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_ACTIVATED, Generation: 1, Slot: "default"}}
		},
		func(id string) Update { return Update{DeviceID: id, At: at, State: st(1)} },
	}
	out := make([]Update, 0, n)
	for i := 0; len(out) < n; i++ {
		step, dev := (i/devices)%len(steps), i%devices
		out = append(out, steps[step](fmt.Sprintf("dev-%05d", dev)))
	}
	return out
}

// BenchmarkDeviceMessages: device messages stored per second through the
// inventory's group commit (Submit, with the writer running) against the
// one-transaction-per-message methods it replaced (the baseline), on the
// same messages and a real SQLite file with synchronous=FULL.
func BenchmarkDeviceMessages(b *testing.B) {
	const devices = 1000
	b.Run("per-message", func(b *testing.B) {
		inv := New(openStore(b), nil, nil)
		msgs := benchMessages(b.N, devices)
		ctx := context.Background()
		b.ResetTimer()
		for _, u := range msgs {
			var err error
			switch {
			case u.Hello != nil:
				err = inv.Hello(ctx, u.DeviceID, u.At, u.Hello)
			case u.Presence != nil:
				err = inv.Presence(ctx, u.DeviceID, u.At, u.Presence)
			case u.State != nil:
				err = inv.State(ctx, u.DeviceID, u.At, u.State)
			default:
				err = inv.Event(ctx, u.DeviceID, u.At, u.Event)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
	})
	groupCommit := func(b *testing.B, resync bool) {
		st := openStore(b)
		var opts []Option
		if resync {
			// Every device says hello first: this is the bookkeeping a
			// complete fleet costs, and no command is sent.
			opts = append(opts, WithResync(startBroker(b), st))
		}
		inv := New(st, nil, nil, opts...)
		msgs := benchMessages(b.N, devices)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- inv.Run(ctx) }()
		last := make(chan error, 1)
		msgs[len(msgs)-1].Done = func(err error) { last <- err }
		b.ResetTimer()
		for _, u := range msgs {
			if err := inv.Submit(ctx, u); err != nil {
				b.Fatal(err)
			}
		}
		if err := <-last; err != nil { // groups commit in order
			b.Fatal(err)
		}
		b.StopTimer()
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		if resync && inv.rs.sent.Value() != 0 {
			b.Fatalf("%d resync commands sent to devices that said hello", inv.rs.sent.Value())
		}
	}
	b.Run("group-commit", func(b *testing.B) { groupCommit(b, false) })
	b.Run("group-commit-resync", func(b *testing.B) { groupCommit(b, true) })
}
