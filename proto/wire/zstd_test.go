package wire

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"
)

func sampleBatch(n int) *pb.TelemetryBatch {
	b := &pb.TelemetryBatch{SpoolEpoch: "0123456789abcdef0123456789abcdef"}
	for i := range n {
		b.Records = append(b.Records, &pb.TelemetryRecord{Seq: uint64(i + 1), Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
			Model: "grid-anomaly", Version: "1.0.0", AtUnixMs: 1_700_000_000_000 + int64(i), LatencyUs: uint32(40 + i%7)}}})
	}
	return b
}

func TestCompressedBatchRoundTrip(t *testing.T) {
	enc, err := NewBatchEncoder()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{0, 1, 500} {
		in := sampleBatch(n)
		z, err := enc.Compress(in)
		if err != nil {
			t.Fatal(err)
		}
		if n == 500 && len(z)*4 > proto.Size(in) {
			t.Errorf("500 records: %d bytes compressed from %d; want at least 4x smaller", len(z), proto.Size(in))
		}
		// Through the envelope, as on the wire.
		payload, err := Seal("dev-1", time.Now(), &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: z}})
		if err != nil {
			t.Fatal(err)
		}
		env, err := Open(Topic("dev-1", KindTelemetry), payload)
		if err != nil {
			t.Fatal(err)
		}
		got, compressed, err := Batch(env)
		if err != nil || !compressed {
			t.Fatalf("Batch: compressed %v, %v", compressed, err)
		}
		if !proto.Equal(got, in) {
			t.Fatalf("%d records: round trip changed the batch", n)
		}
	}
	plain, _ := Seal("dev-1", time.Now(), sampleBatch(2))
	env, _ := Open(Topic("dev-1", KindTelemetry), plain)
	if got, compressed, err := Batch(env); err != nil || compressed || len(got.GetRecords()) != 2 {
		t.Fatalf("plain batch: %v %v %v", got, compressed, err)
	}
	hello, _ := Seal("dev-1", time.Now(), &pb.Hello{})
	env, _ = Open(Topic("dev-1", KindHello), hello)
	if _, _, err := Batch(env); err == nil {
		t.Fatal("Batch of a hello succeeded")
	}
	if _, err := Seal("dev-1", time.Now(), &pb.Envelope{}); err == nil {
		t.Fatal("sealed an envelope without a body")
	}
}

// An encoder makes a zstd state (about 1.3 MB) only when all it has are
// busy: one goroutine at a time never needs a second, and concurrent
// callers never get more than the limit.
func TestBatchEncoderStates(t *testing.T) {
	enc, err := newBatchEncoder(2)
	if err != nil {
		t.Fatal(err)
	}
	states := func() int {
		enc.mu.Lock()
		defer enc.mu.Unlock()
		return len(enc.idle)
	}
	for range 5 {
		if _, err := enc.Compress(sampleBatch(50)); err != nil {
			t.Fatal(err)
		}
	}
	if n := states(); n != 1 {
		t.Fatalf("one caller at a time: %d states, want 1", n)
	}
	in := sampleBatch(200)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			for range 10 {
				z, err := enc.Compress(in)
				if err == nil {
					var got *pb.TelemetryBatch
					if got, err = DecompressBatch(z); err == nil && !proto.Equal(got, in) {
						err = errors.New("round trip changed the batch")
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := states(); n < 1 || n > 2 {
		t.Fatalf("8 concurrent callers, limit 2: %d states", n)
	}
}

func TestDecompressRefuses(t *testing.T) {
	// A bomb: far more than MaxDecompressed of zeros compresses to a few
	// hundred bytes.
	big, _ := zstd.NewWriter(nil)
	bomb := big.EncodeAll(make([]byte, 8*MaxDecompressed), nil)
	// A frame whose header does not announce its size, so the cap must
	// stop the decoder while it runs.
	var stream bytes.Buffer
	w, _ := zstd.NewWriter(&stream, zstd.WithWindowSize(zstdWindow))
	w.Write(make([]byte, 2*MaxDecompressed))
	w.Close()
	state, _ := newZstdState()
	notBatch := state.EncodeAll([]byte{0xff, 0xff, 0xff}, nil)
	enc, _ := NewBatchEncoder()
	cases := []struct {
		name string
		in   []byte
		want error
	}{
		{"bomb", bomb, ErrTooLarge},
		{"unsized stream", stream.Bytes(), ErrTooLarge},
		{"over the payload cap", make([]byte, MaxPayload+1), ErrTooLarge},
		{"garbage", []byte("not zstd at all"), ErrBadCompressed},
		{"truncated", bomb[:len(bomb)/2], nil},
		{"not a batch", notBatch, ErrBadCompressed},
	}
	for _, c := range cases {
		_, err := DecompressBatch(c.in)
		if err == nil {
			t.Errorf("%s: decoded", c.name)
			continue
		}
		if c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	// A batch too big to send is refused by the encoder, not the receiver.
	huge := &pb.TelemetryBatch{Records: []*pb.TelemetryRecord{{Body: &pb.TelemetryRecord_Sample{Sample: &pb.RawSample{Inputs: make([]byte, MaxDecompressed)}}}}}
	if _, err := enc.Compress(huge); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("compress of an oversized batch: %v", err)
	}
}

func FuzzDecompressBatch(f *testing.F) {
	enc, err := NewBatchEncoder()
	if err != nil {
		f.Fatal(err)
	}
	for _, n := range []int{0, 1, 20} {
		z, _ := enc.Compress(sampleBatch(n))
		f.Add(z)
	}
	f.Add([]byte{})
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd}) // the zstd magic alone
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := DecompressBatch(data)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes and decodes to the same batch.
		z, err := enc.Compress(b)
		if err != nil {
			t.Fatalf("re-compress: %v", err)
		}
		again, err := DecompressBatch(z)
		if err != nil || !proto.Equal(again, b) {
			t.Fatalf("round trip of a decoded batch: %v", err)
		}
	})
}
