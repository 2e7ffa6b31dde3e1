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
// directly, and reads inference records into compact rows
// (store.InferenceRow: seq, time, latency and indexes of the batch's model
// versions and error texts), so a batch of hundreds costs a few
// allocations and the store folds the rows without a map lookup each. Rare
// records (events, aggregates, samples) go through proto.Unmarshal into
// full records. FuzzDecodeBatch holds it to proto.Unmarshal's result.

// ErrMalformed is wrapped by every error about a batch that does not
// decode.
var ErrMalformed = errors.New("malformed telemetry batch")

// Decoded is a telemetry batch ready for the store.
type Decoded struct {
	Epoch string
	// Records are the records other than per-inference ones, which are in
	// Inferences; or all of them, in batch order, when the batch's seqs do
	// not ascend (an agent never sends such a batch).
	Records []store.TelemetryRecord
	// Inferences, Names and Errors are as in store.TelemetryBatch; the
	// rows' seqs ascend, and interleave with those of Records.
	Inferences []store.InferenceRow
	Names      []store.ModelVersion
	Errors     []string
}

// All returns every record of d as a full record, in seq order (batch
// order, since d's seqs ascend when it has compact rows), for tests and
// tools; the store takes d as it is.
func (d Decoded) All(seen time.Time) []store.TelemetryRecord {
	out := make([]store.TelemetryRecord, 0, len(d.Records)+len(d.Inferences))
	i := 0
	for _, r := range d.Inferences {
		for ; i < len(d.Records) && d.Records[i].Seq < r.Seq; i++ {
			out = append(out, d.Records[i])
		}
		n := d.Names[r.Name]
		rec := store.TelemetryRecord{Seq: r.Seq, Kind: store.RecordInference, Model: n.Model, Version: n.Version, At: seen, LatencyUS: r.LatencyUS}
		if r.AtMS > 0 {
			rec.At = time.UnixMilli(r.AtMS)
		}
		if r.Error != 0 {
			rec.Error = d.Errors[r.Error-1]
		}
		out = append(out, rec)
	}
	return append(out, d.Records[i:]...)
}

// DecodeBatch decodes a serialized TelemetryBatch of device id received
// at seen. raw must be at most wire.MaxDecompressed bytes.
func DecodeBatch(id string, seen time.Time, raw []byte) (Decoded, error) {
	if len(raw) > wire.MaxDecompressed {
		return Decoded{}, fmt.Errorf("%w: %d bytes (limit %d)", wire.ErrTooLarge, len(raw), wire.MaxDecompressed)
	}
	d, ascending, err := decodeBatch(id, seen, raw, true)
	if err == nil && !ascending {
		// Compact rows only for ascending seqs, where the store can tell
		// the batch's repeats apart cheaply and All restores the order.
		d, _, err = decodeBatch(id, seen, raw, false)
	}
	return d, err
}

// decodeBatch decodes raw, per-inference records into compact rows when
// compact is set, and says whether the records' seqs ascend strictly.
func decodeBatch(id string, seen time.Time, raw []byte, compact bool) (d Decoded, ascending bool, err error) {
	dec := decoder{id: id, seen: seen, d: &d, compact: compact, ascending: true}
	// An inference record takes some 30 bytes; growing the slice by
	// appending cost more than decoding.
	if compact {
		d.Inferences = make([]store.InferenceRow, 0, len(raw)/28+1)
	} else {
		d.Records = make([]store.TelemetryRecord, 0, len(raw)/28+1)
	}
	for len(raw) > 0 {
		num, typ, n := consumeTag(raw)
		if n < 0 {
			return d, false, malformed(n)
		}
		raw = raw[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := consumeBytes(raw)
			if n < 0 {
				return d, false, malformed(n)
			}
			d.Epoch, raw = string(v), raw[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := consumeBytes(raw)
			if n < 0 {
				return d, false, malformed(n)
			}
			raw = raw[n:]
			if compact && dec.fast(v) {
				continue
			}
			dec.prefix = nil // record may name rows itself
			if err := dec.record(v); err != nil {
				return d, false, err
			}
		default:
			n := protowire.ConsumeFieldValue(num, typ, raw)
			if n < 0 {
				return d, false, malformed(n)
			}
			raw = raw[n:]
		}
	}
	return d, dec.ascending, nil
}

func malformed(n int) error {
	return fmt.Errorf("%w: %v", ErrMalformed, protowire.ParseError(n))
}

// decoder is the state of one DecodeBatch.
type decoder struct {
	id        string
	seen      time.Time
	d         *Decoded
	compact   bool
	ascending bool
	n         int // records so far
	last      uint64
	// interner turns the model and version bytes of consecutive records
	// into the same strings without allocating again.
	model, version string
	// prefix is the model and version fields of the last inference read
	// by fast, as they were on the wire: the next record nearly always
	// starts its body with the same bytes.
	prefix []byte
}

// fast reads one serialized TelemetryRecord laid out as agents write
// them (seq, then an inference body whose fields come in field order,
// each once) into a compact row, and reports whether it could; any other
// layout is left to record, which reads every layout proto.Unmarshal
// reads. A record the fast path takes decodes exactly as record would:
// FuzzDecodeBatch holds both to proto.Unmarshal.
func (dec *decoder) fast(raw []byte) bool {
	if len(raw) < 2 || raw[0] != 0x08 { // seq, varint
		return false
	}
	seq, n := consumeVarint(raw[1:])
	if n < 0 {
		return false
	}
	raw = raw[1+n:]
	if len(raw) < 2 || raw[0] != 0x12 { // inference, bytes
		return false
	}
	body, n := consumeBytes(raw[1:])
	if n < 0 || 1+n != len(raw) {
		return false
	}
	// The model and version fields: the same bytes as the last record's,
	// or read here.
	var model, version []byte
	same := len(dec.prefix) > 0 && len(body) >= len(dec.prefix) && string(body[:len(dec.prefix)]) == string(dec.prefix)
	rest := body
	if same {
		rest = body[len(dec.prefix):]
	} else {
		if len(rest) > 0 && rest[0] == 0x0a {
			v, n := consumeBytes(rest[1:])
			if n < 0 {
				return false
			}
			model, rest = v, rest[1+n:]
		}
		if len(rest) > 0 && rest[0] == 0x12 {
			v, n := consumeBytes(rest[1:])
			if n < 0 {
				return false
			}
			version, rest = v, rest[1+n:]
		}
	}
	afterNames := rest
	var atMS int64
	var latency uint32
	var errText []byte
	if len(rest) > 0 && rest[0] == 0x18 {
		v, n := consumeVarint(rest[1:])
		if n < 0 {
			return false
		}
		atMS, rest = int64(v), rest[1+n:]
	}
	if len(rest) > 0 && rest[0] == 0x20 {
		v, n := consumeVarint(rest[1:])
		if n < 0 {
			return false
		}
		latency, rest = uint32(v), rest[1+n:]
	}
	if len(rest) > 0 && rest[0] == 0x2a {
		v, n := consumeBytes(rest[1:])
		if n < 0 {
			return false
		}
		errText, rest = v, rest[1+n:]
	}
	if len(rest) != 0 {
		return false // another field, or one repeated: record reads it
	}
	if !same {
		dec.name(model, version)
		dec.prefix = body[:len(body)-len(afterNames)]
	}
	dec.sequence(seq)
	dec.row(seq, atMS, latency, errText)
	return true
}

// sequence notes the next record's seq.
func (dec *decoder) sequence(seq uint64) {
	if dec.n > 0 && seq <= dec.last {
		dec.ascending = false
	}
	dec.n, dec.last = dec.n+1, seq
}

// name makes model@version the name of the next rows. Consecutive records
// nearly always name the same model version as the one before: it is
// compared with the last entry only. Repeated entries further back cost a
// little memory, not a wrong count (the store keys minutes by the names,
// not the indexes).
func (dec *decoder) name(model, version []byte) {
	d := dec.d
	if k := len(d.Names); k == 0 || string(model) != d.Names[k-1].Model || string(version) != d.Names[k-1].Version {
		d.Names = append(d.Names, store.ModelVersion{Model: string(model), Version: string(version)})
	}
}

// row appends a compact row named by the last name.
func (dec *decoder) row(seq uint64, atMS int64, latency uint32, errText []byte) {
	d := dec.d
	row := store.InferenceRow{Seq: seq, AtMS: atMS, LatencyUS: latency, Name: uint32(len(d.Names) - 1)}
	if len(errText) > 0 {
		if k := len(d.Errors); k == 0 || string(errText) != d.Errors[k-1] {
			d.Errors = append(d.Errors, string(errText))
		}
		row.Error = uint32(len(d.Errors))
	}
	d.Inferences = append(d.Inferences, row)
}

func (dec *decoder) intern(last *string, b []byte) string {
	if string(b) == *last { // compiled without an allocation
		return *last
	}
	*last = string(b)
	return *last
}

// record decodes one serialized TelemetryRecord.
func (dec *decoder) record(raw []byte) error {
	whole := raw
	var seq uint64
	var body []byte
	var bodyNum protowire.Number
	for len(raw) > 0 {
		num, typ, n := consumeTag(raw)
		if n < 0 {
			return malformed(n)
		}
		raw = raw[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := consumeVarint(raw)
			if n < 0 {
				return malformed(n)
			}
			seq, raw = v, raw[n:]
		case num >= 2 && num <= 5 && typ == protowire.BytesType:
			v, n := consumeBytes(raw)
			if n < 0 {
				return malformed(n)
			}
			raw = raw[n:]
			if bodyNum != 0 {
				// A body set twice: proto.Unmarshal merges or replaces;
				// let it, rather than copy its rules.
				bodyNum = -1
				continue
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
	dec.sequence(seq)
	if bodyNum == 2 && dec.compact {
		f, err := inferenceFields(body)
		if err != nil {
			return err
		}
		dec.name(f.model, f.version)
		dec.row(seq, f.atMS, f.latency, f.errText)
		return nil
	}
	dec.d.Records = append(dec.d.Records, store.TelemetryRecord{})
	rec := &dec.d.Records[len(dec.d.Records)-1]
	rec.Seq, rec.Kind, rec.At = seq, store.RecordOther, dec.seen
	id, seen := dec.id, dec.seen
	switch bodyNum {
	case -1:
		var r pb.TelemetryRecord
		if err := proto.Unmarshal(whole, &r); err != nil {
			return fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		if inf := r.GetInference(); inf != nil && dec.compact {
			// Merged bodies make an inference after all: a row.
			dec.d.Records = dec.d.Records[:len(dec.d.Records)-1]
			dec.d.Names = append(dec.d.Names, store.ModelVersion{Model: inf.GetModel(), Version: inf.GetVersion()})
			dec.row(r.GetSeq(), inf.GetAtUnixMs(), inf.GetLatencyUs(), []byte(inf.GetError()))
			return nil
		}
		*rec = recordFrom(id, &r, seen)
	case 2:
		f, err := inferenceFields(body)
		if err != nil {
			return err
		}
		rec.Kind, rec.LatencyUS = store.RecordInference, f.latency
		rec.Model, rec.Version = dec.intern(&dec.model, f.model), dec.intern(&dec.version, f.version)
		if len(f.errText) > 0 {
			rec.Error = string(f.errText)
		}
		if f.atMS > 0 {
			rec.At = time.UnixMilli(f.atMS)
		}
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

// inferenceRecord is a serialized InferenceRecord's fields; the byte
// slices point into it.
type inferenceRecord struct {
	model, version, errText []byte
	atMS                    int64
	latency                 uint32
}

// inferenceFields reads a serialized InferenceRecord in any layout
// proto.Unmarshal reads (fields in any order, repeated: the last wins,
// unknown ones skipped).
func inferenceFields(raw []byte) (f inferenceRecord, err error) {
	for len(raw) > 0 {
		num, typ, n := consumeTag(raw)
		if n < 0 {
			return f, malformed(n)
		}
		raw = raw[n:]
		switch {
		case (num == 1 || num == 2 || num == 5) && typ == protowire.BytesType:
			v, n := consumeBytes(raw)
			if n < 0 {
				return f, malformed(n)
			}
			raw = raw[n:]
			switch num {
			case 1:
				f.model = v
			case 2:
				f.version = v
			case 5:
				f.errText = v
			}
		case (num == 3 || num == 4) && typ == protowire.VarintType:
			v, n := consumeVarint(raw)
			if n < 0 {
				return f, malformed(n)
			}
			raw = raw[n:]
			if num == 3 {
				f.atMS = int64(v)
			} else {
				f.latency = uint32(v)
			}
		default:
			n := protowire.ConsumeFieldValue(num, typ, raw)
			if n < 0 {
				return f, malformed(n)
			}
			raw = raw[n:]
		}
	}
	return f, nil
}

// zstdDecoder decompresses batches under wire.MaxDecompressed, like
// wire.DecompressBatch, but hands back the bytes for DecodeBatch.
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(wire.MaxDecompressed),
		zstd.WithDecoderMaxWindow(256<<10))
})

// expanded holds buffers for decompressed batches.
var expanded = sync.Pool{New: func() any { return new([]byte) }}

// decompress expands Envelope.telemetry_zstd, refusing input over
// wire.MaxPayload and output over wire.MaxDecompressed.
func decompress(data, dst []byte) ([]byte, error) {
	if len(data) > wire.MaxPayload {
		return nil, fmt.Errorf("compressed telemetry batch of %d bytes: %w (limit %d)", len(data), wire.ErrTooLarge, wire.MaxPayload)
	}
	dec, err := zstdDecoder()
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	raw, err := dec.DecodeAll(data, dst)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", wire.ErrBadCompressed, err)
	}
	if len(raw) > wire.MaxDecompressed {
		return nil, fmt.Errorf("compressed telemetry batch expands to %d bytes: %w (limit %d)", len(raw), wire.ErrTooLarge, wire.MaxDecompressed)
	}
	return raw, nil
}

// consumeTag, consumeVarint and consumeBytes are protowire's, with the
// one-byte case (every tag, and nearly every value and length, of an
// inference record) inline: a batch has some 2,500 of them.
func consumeTag(b []byte) (protowire.Number, protowire.Type, int) {
	if len(b) > 0 && b[0] < 0x80 && b[0]>>3 != 0 {
		return protowire.Number(b[0] >> 3), protowire.Type(b[0] & 7), 1
	}
	return protowire.ConsumeTag(b)
}

func consumeVarint(b []byte) (uint64, int) {
	if len(b) > 0 && b[0] < 0x80 {
		return uint64(b[0]), 1
	}
	return protowire.ConsumeVarint(b)
}

func consumeBytes(b []byte) ([]byte, int) {
	if len(b) > 0 && b[0] < 0x80 {
		if n := int(b[0]); n < len(b) {
			return b[1 : 1+n], 1 + n
		}
	}
	return protowire.ConsumeBytes(b)
}
