package wire

// Compressed telemetry batches: Envelope.telemetry_zstd carries a
// serialized TelemetryBatch compressed with zstd. Agents that announce the
// CapabilityTelemetryZstd capability send them; receivers decode both
// forms with Batch.

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"
)

// CapabilityTelemetryZstd is the Hello capability of an agent that sends
// telemetry batches compressed (Envelope.telemetry_zstd).
const CapabilityTelemetryZstd = "telemetry-zstd"

// MaxDecompressed caps a compressed batch's decompressed size. A plain
// batch can be no bigger than MaxPayload, so neither can a compressed one:
// the cap keeps a small hostile payload from expanding into gigabytes.
const MaxDecompressed = MaxPayload

// zstdWindow is the encoder's window. A batch is at most MaxDecompressed
// bytes, so a bigger window gains nothing, and the decoder refuses frames
// that ask for more.
const zstdWindow = 256 << 10

// ErrBadCompressed is wrapped by every error about a compressed batch that
// does not decode.
var ErrBadCompressed = errors.New("compressed telemetry batch does not decode")

// BatchEncoder compresses telemetry batches. It holds zstd encoder states
// (their tables are the expensive part, about 1.3 MB each once used) and
// reuses them for every batch. It makes a state only when every state it
// has is busy, up to its limit, so a process that compresses on one
// goroutine at a time (an agent) holds one state whatever its core count.
// It is safe for concurrent use.
type BatchEncoder struct {
	// slots holds a token per state in use: at most its capacity exist.
	slots chan struct{}
	mu    sync.Mutex
	idle  []*zstd.Encoder
}

// NewBatchEncoder returns an encoder of one zstd state (concurrent calls
// take turns), at zstd's default level: on a batch of 500 inference
// records (20 KB) it compressed to 2,639 bytes, as small as
// SpeedBetterCompression (2,637) for about 70% of its CPU, and 2% smaller
// than SpeedFastest for about the same CPU (measured 2026-11-27). Senders
// in one process should share SharedBatchEncoder instead.
func NewBatchEncoder() (*BatchEncoder, error) { return newBatchEncoder(1) }

// newBatchEncoder returns an encoder of at most limit states. It makes the
// first one now, so that bad options fail here; zstd allocates a state's
// tables on its first use, not here.
func newBatchEncoder(limit int) (*BatchEncoder, error) {
	first, err := newZstdState()
	if err != nil {
		return nil, err
	}
	return &BatchEncoder{slots: make(chan struct{}, max(limit, 1)), idle: []*zstd.Encoder{first}}, nil
}

// newZstdState is one encoder state: a zstd.Encoder that compresses one
// batch at a time.
func newZstdState() (*zstd.Encoder, error) {
	enc, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedDefault),
		zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(zstdWindow),
		zstd.WithEncoderCRC(true),
		zstd.WithZeroFrames(true),
		zstd.WithLowerEncoderMem(true))
	if err != nil {
		return nil, fmt.Errorf("zstd encoder: %w", err)
	}
	return enc, nil
}

// take returns an idle state, or a new one when none is idle; the caller
// holds a slot, so no more states exist than slots.
func (e *BatchEncoder) take() (*zstd.Encoder, error) {
	e.mu.Lock()
	if n := len(e.idle); n > 0 {
		enc := e.idle[n-1]
		e.idle = e.idle[:n-1]
		e.mu.Unlock()
		return enc, nil
	}
	e.mu.Unlock()
	return newZstdState()
}

func (e *BatchEncoder) give(enc *zstd.Encoder) {
	e.mu.Lock()
	e.idle = append(e.idle, enc)
	e.mu.Unlock()
}

// SharedBatchEncoder returns the process's batch encoder, made on first
// use, of at most GOMAXPROCS encoder states. Telemetry senders share it:
// an agent holds one state, and the fleet simulator's thousand agents in
// one process a few, instead of a thousand (1.3 GB).
var SharedBatchEncoder = sync.OnceValues(func() (*BatchEncoder, error) {
	return newBatchEncoder(runtime.GOMAXPROCS(0))
})

// Compress serializes b and compresses it, for Envelope.telemetry_zstd.
// A batch whose serialized form is over MaxDecompressed is refused: the
// receiver would refuse it.
func (e *BatchEncoder) Compress(b *pb.TelemetryBatch) ([]byte, error) {
	raw, err := proto.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("compress telemetry batch: %w", err)
	}
	if len(raw) > MaxDecompressed {
		return nil, fmt.Errorf("compress telemetry batch: %d bytes: %w (limit %d)", len(raw), ErrTooLarge, MaxDecompressed)
	}
	e.slots <- struct{}{}
	defer func() { <-e.slots }()
	enc, err := e.take()
	if err != nil {
		return nil, fmt.Errorf("compress telemetry batch: %w", err)
	}
	out := enc.EncodeAll(raw, make([]byte, 0, len(raw)/4+64))
	e.give(enc)
	return out, nil
}

// shared is the process's zstd decoder, made on first use by decoder.
// It is a sync.Once behind a function, not a package-level
// sync.OnceValues: a value built at package init keeps its closure, and
// with it zstd's whole decoder, in every binary that imports this package,
// the agent's included, which never decompresses (140 KiB of its binary).
var shared struct {
	once sync.Once
	dec  *zstd.Decoder
	err  error
}

func decoder() (*zstd.Decoder, error) {
	shared.once.Do(func() {
		shared.dec, shared.err = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderMaxMemory(MaxDecompressed),
			zstd.WithDecoderMaxWindow(zstdWindow))
	})
	return shared.dec, shared.err
}

// DecompressBatch decodes Envelope.telemetry_zstd. It refuses input over
// MaxPayload before looking at it, and stops decompressing at
// MaxDecompressed bytes; both errors wrap ErrTooLarge, every other failure
// ErrBadCompressed. It is safe for concurrent use.
func DecompressBatch(data []byte) (*pb.TelemetryBatch, error) {
	if len(data) > MaxPayload {
		return nil, fmt.Errorf("compressed telemetry batch of %d bytes: %w (limit %d)", len(data), ErrTooLarge, MaxPayload)
	}
	dec, err := decoder()
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	raw, err := dec.DecodeAll(data, nil)
	if err != nil {
		if errors.Is(err, zstd.ErrDecoderSizeExceeded) || errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrFrameSizeExceeded) {
			return nil, fmt.Errorf("compressed telemetry batch expands beyond %d bytes: %w", MaxDecompressed, ErrTooLarge)
		}
		return nil, fmt.Errorf("%w: %v", ErrBadCompressed, err)
	}
	if len(raw) > MaxDecompressed {
		return nil, fmt.Errorf("compressed telemetry batch expands to %d bytes: %w (limit %d)", len(raw), ErrTooLarge, MaxDecompressed)
	}
	b := &pb.TelemetryBatch{}
	if err := proto.Unmarshal(raw, b); err != nil {
		return nil, fmt.Errorf("%w: the decompressed bytes are not a TelemetryBatch: %v", ErrBadCompressed, err)
	}
	return b, nil
}

// Batch returns the telemetry batch an envelope carries, plain
// (Envelope.telemetry) or compressed (Envelope.telemetry_zstd), and
// whether it was compressed. An envelope with neither is an error.
func Batch(env *pb.Envelope) (b *pb.TelemetryBatch, compressed bool, err error) {
	switch body := env.GetBody().(type) {
	case *pb.Envelope_Telemetry:
		return body.Telemetry, false, nil
	case *pb.Envelope_TelemetryZstd:
		b, err := DecompressBatch(body.TelemetryZstd)
		return b, true, err
	}
	return nil, false, fmt.Errorf("envelope carries %q, not a telemetry batch", bodyKind(env))
}
