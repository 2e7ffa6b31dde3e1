package telemetry

import (
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// compressedBatches splits what the controller got into compressed and
// plain batches.
func (r *rig) compressedBatches() (z, plain []*pb.TelemetryBatch) {
	for _, m := range r.ctl.Messages() {
		if b := m.Env.GetTelemetry(); b != nil {
			if m.Compressed {
				z = append(z, b)
			} else {
				plain = append(plain, b)
			}
		}
	}
	return z, plain
}

func TestCompression(t *testing.T) {
	cases := []struct {
		name string
		mode Compression
		// reads is whether the controller acknowledges compressed batches.
		reads bool
		// compressed is whether the batches after the first go compressed.
		compressed bool
	}{
		{"auto, controller reads zstd", CompressAuto, true, true},
		{"auto, older controller", CompressAuto, false, false},
		{"off", CompressOff, true, false},
		{"always", CompressAlways, true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := newRig(t, Options{BatchSize: 100, Window: 1, AckTimeout: 500 * time.Millisecond, Poll: 20 * time.Millisecond, Compression: c.mode})
			if got := r.sender.Compresses(); got != (c.mode != CompressOff) {
				t.Fatalf("Compresses() = %v", got)
			}
			r.append(300, "")
			// The controller acks what it can read; one that does not read
			// zstd drops those batches, as an older one's wire.Open would.
			var flags []bool
			handled := 0
			deadline := time.Now().Add(15 * time.Second)
			for r.depth() != 0 {
				if time.Now().After(deadline) {
					t.Fatalf("spool not drained; batches compressed: %v", flags)
				}
				msgs := r.ctl.Messages()
				for _, m := range msgs[handled:] {
					b := m.Env.GetTelemetry()
					if b == nil {
						continue
					}
					flags = append(flags, m.Compressed)
					if m.Compressed && !c.reads {
						continue
					}
					r.ack(r.spool.Epoch(), ackAll(b))
				}
				handled = len(msgs)
				time.Sleep(5 * time.Millisecond)
			}
			if len(flags) < 3 {
				t.Fatalf("%d batches for 300 records in batches of 100", len(flags))
			}
			if want := c.mode != CompressOff; flags[0] != want {
				t.Fatalf("first batch compressed %v, want %v", flags[0], want)
			}
			for i, f := range flags[1:] {
				if f != c.compressed {
					t.Fatalf("batch %d compressed %v, want %v (all: %v)", i+2, f, c.compressed, flags)
				}
			}
			z, _ := r.compressedBatches()
			st := r.sender.Stats()
			if st.Compressed != uint64(len(z)) || st.Bytes == 0 || st.PlainBytes < st.Bytes || st.Window != 1 {
				t.Fatalf("stats %+v; controller got %d compressed batches", st, len(z))
			}
		})
	}
}
