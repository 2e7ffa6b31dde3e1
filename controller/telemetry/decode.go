package telemetry

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/controller/inventory"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// Decoding a batch is the hot path of ingest: a batch holds hundreds of
// inference records, and proto.Unmarshal allocates five objects for each
// (record, body, three strings). DecodeBatch reads the wire format
// directly: an inference record costs no allocation when its model and
// version repeat the previous record's (they nearly always do) and it did
// not fail. Rare records (events, aggregates, samples) go through
// proto.Unmarshal. FuzzDecodeBatch holds it to proto.Unmarshal's result.

// ErrMalformed is wrapped by every error about a batch that does not
// decode.
var ErrMalformed = errors.New("malformed telemetry batch")

// Decoded is a telemetry batch ready for the store.
type Decoded struct {
	Epoch   string
	Records []store.TelemetryRecord
}

// DecodeBatch decodes a serialized TelemetryBatch of device id received
// at seen. raw must be at most wire.MaxDecompressed bytes.
func DecodeBatch(id string, seen time.Time, raw []byte) (Decoded, error) {
	var d Decoded
	if len(raw) > wire.MaxDecompressed {
		return d, fmt.Errorf("%w: %d bytes (limit %d)", wire.ErrTooLarge, len(raw), wire.MaxDecompressed)
	}
	var in interner
	// An inference record takes some 30 bytes; growing the slice by
	// appending cost more than decoding.
	d.Records = make([]store.TelemetryRecord, 0, len(raw)/28+1)
	for len(raw) > 0 {
		num, typ, n := protowire.ConsumeTag(raw)
		if n < 0 {
			return d, malformed(n)
		}
		raw = raw[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(raw)
			if n < 0 {
				return d, malformed(n)
			}
			d.Epoch, raw = string(v), raw[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(raw)
			if n < 0 {
				return d, malformed(n)
			}
			raw = raw[n:]
			// Decoded in place: a record is some 200 bytes, and copying
			// it out of each call cost as much as decoding it.
			d.Records = append(d.Records, store.TelemetryRecord{})
			if err := decodeRecord(id, seen, v, &in, &d.Records[len(d.Records)-1]); err != nil {
				return d, err
			}
		default:
			n := protowire.ConsumeFieldValue(num, typ, raw)
			if n < 0 {
				return d, malformed(n)
			}
			raw = raw[n:]
		}
	}
	return d, nil
}

func malformed(n int) error {
	return fmt.Errorf("%w: %v", ErrMalformed, protowire.ParseError(n))
}

// interner turns the model and version bytes of consecutive records into
// the same strings without allocating again.
type interner struct{ model, version string }

func (in *interner) get(last *string, b []byte) string {
	if string(b) == *last { // compiled without an allocation
		return *last
	}
	*last = string(b)
	return *last
}

func decodeRecord(id string, seen time.Time, raw []byte, in *interner, rec *store.TelemetryRecord) error {
	rec.Kind, rec.At = store.RecordOther, seen
	whole := raw
	var body []byte
	var bodyNum protowire.Number
	for len(raw) > 0 {
		num, typ, n := protowire.ConsumeTag(raw)
		if n < 0 {
			return malformed(n)
		}
		raw = raw[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(raw)
			if n < 0 {
				return malformed(n)
			}
			rec.Seq, raw = v, raw[n:]
		case num >= 2 && num <= 5 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(raw)
			if n < 0 {
				return malformed(n)
			}
			raw = raw[n:]
			if bodyNum != 0 {
				// A body set twice: proto.Unmarshal merges or replaces;
				// let it, rather than copy its rules.
				return slowRecord(id, seen, whole, rec)
			}
			body, bodyNum = v, num
		default:
			n := protowire.ConsumeFieldValue(num, typ, raw)
			if n < 0 {
				return malformed(n)
			}
			raw = raw[n:]
		}
	}
	switch bodyNum {
	case 2:
		return decodeInference(rec, body, in)
	case 3:
		ev := new(pb.Event)
		if err := proto.Unmarshal(body, ev); err != nil {
			return fmt.Errorf("%w: event of seq %d: %v", ErrMalformed, rec.Seq, err)
		}
		e := inventory.EventFrom(id, ev, seen)
		rec.Kind, rec.Model, rec.Version, rec.At, rec.Event = store.RecordEvent, e.Model, e.Version, e.At, &e
	case 4:
		a := new(pb.InferenceAggregate)
		if err := proto.Unmarshal(body, a); err != nil {
			return fmt.Errorf("%w: aggregate of seq %d: %v", ErrMalformed, rec.Seq, err)
		}
		rec.Kind, rec.Model, rec.Version, rec.Aggregate = store.RecordAggregate, a.GetModel(), a.GetVersion(), a
	case 5:
		sm := new(pb.RawSample)
		if err := proto.Unmarshal(body, sm); err != nil {
			return fmt.Errorf("%w: sample of seq %d: %v", ErrMalformed, rec.Seq, err)
		}
		rec.Kind, rec.Model, rec.Version = store.RecordSample, sm.GetModel(), sm.GetVersion()
	}
	return nil
}

func decodeInference(rec *store.TelemetryRecord, raw []byte, in *interner) error {
	rec.Kind = store.RecordInference
	var atMS int64
	for len(raw) > 0 {
		num, typ, n := protowire.ConsumeTag(raw)
		if n < 0 {
			return malformed(n)
		}
		raw = raw[n:]
		switch {
		case (num == 1 || num == 2 || num == 5) && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(raw)
			if n < 0 {
				return malformed(n)
			}
			raw = raw[n:]
			switch num {
			case 1:
				rec.Model = in.get(&in.model, v)
			case 2:
				rec.Version = in.get(&in.version, v)
			case 5:
				rec.Error = string(v)
			}
		case (num == 3 || num == 4) && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(raw)
			if n < 0 {
				return malformed(n)
			}
			raw = raw[n:]
			if num == 3 {
				atMS = int64(v)
			} else {
				rec.LatencyUS = uint32(v)
			}
		default:
			n := protowire.ConsumeFieldValue(num, typ, raw)
			if n < 0 {
				return malformed(n)
			}
			raw = raw[n:]
		}
	}
	if atMS > 0 {
		rec.At = time.UnixMilli(atMS)
	}
	return nil
}

// zstdDecoder decompresses batches under wire.MaxDecompressed, like
// wire.DecompressBatch, but hands back the bytes for DecodeBatch.
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(wire.MaxDecompressed),
		zstd.WithDecoderMaxWindow(256<<10))
})

// decompress expands Envelope.telemetry_zstd, refusing input over
// wire.MaxPayload and output over wire.MaxDecompressed.
func decompress(data []byte) ([]byte, error) {
	if len(data) > wire.MaxPayload {
		return nil, fmt.Errorf("compressed telemetry batch of %d bytes: %w (limit %d)", len(data), wire.ErrTooLarge, wire.MaxPayload)
	}
	dec, err := zstdDecoder()
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	raw, err := dec.DecodeAll(data, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", wire.ErrBadCompressed, err)
	}
	if len(raw) > wire.MaxDecompressed {
		return nil, fmt.Errorf("compressed telemetry batch expands to %d bytes: %w (limit %d)", len(raw), wire.ErrTooLarge, wire.MaxDecompressed)
	}
	return raw, nil
}

func slowRecord(id string, seen time.Time, raw []byte, rec *store.TelemetryRecord) error {
	var r pb.TelemetryRecord
	if err := proto.Unmarshal(raw, &r); err != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	*rec = recordFrom(id, &r, seen)
	return nil
}
