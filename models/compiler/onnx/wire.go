package onnx

import (
	"encoding/binary"
	"fmt"
	"math"

	"google.golang.org/protobuf/encoding/protowire"
)

// field is one protobuf field as read off the wire: for length-delimited
// fields Bytes holds the payload, for the others Num holds the value (the
// varint, or the bits of a fixed32/fixed64).
type field struct {
	Num   protowire.Number
	Type  protowire.Type
	Bytes []byte
	Int   uint64
}

// eachField calls fn for every field of message b, in wire order. Groups
// are skipped; any malformed encoding is an error naming where.
func eachField(b []byte, what string, fn func(f field) error) error {
	off := 0
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("%w: %s: bad field tag at byte %d: %v", ErrInvalid, what, off, protowire.ParseError(n))
		}
		f := field{Num: num, Type: typ}
		rest := b[n:]
		var m int
		switch typ {
		case protowire.VarintType:
			f.Int, m = protowire.ConsumeVarint(rest)
		case protowire.Fixed32Type:
			var v uint32
			v, m = protowire.ConsumeFixed32(rest)
			f.Int = uint64(v)
		case protowire.Fixed64Type:
			f.Int, m = protowire.ConsumeFixed64(rest)
		case protowire.BytesType:
			f.Bytes, m = protowire.ConsumeBytes(rest)
		default:
			m = protowire.ConsumeFieldValue(num, typ, rest)
		}
		if m < 0 {
			return fmt.Errorf("%w: %s: field %d at byte %d: %v (truncated or corrupted file?)", ErrInvalid, what, num, off, protowire.ParseError(m))
		}
		if typ == protowire.VarintType || typ == protowire.Fixed32Type || typ == protowire.Fixed64Type || typ == protowire.BytesType {
			if err := fn(f); err != nil {
				return err
			}
		}
		b = rest[m:]
		off += n + m
	}
	return nil
}

// want checks a known field has the wire type its schema gives it.
func (f field) want(t protowire.Type, what string) error {
	if f.Type != t {
		return fmt.Errorf("%w: %s field %d has wire type %d, want %d (corrupted file?)", ErrInvalid, what, f.Num, f.Type, t)
	}
	return nil
}

// varints reads a repeated integer field, packed or not, appending to dst.
func (f field) varints(dst []int64, what string, limit int) ([]int64, error) {
	switch f.Type {
	case protowire.VarintType:
		return append(dst, int64(f.Int)), nil
	case protowire.BytesType:
		b := f.Bytes
		for len(b) > 0 {
			if len(dst) >= limit {
				return nil, fmt.Errorf("%w: %s: more than %d values", ErrInvalid, what, limit)
			}
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return nil, fmt.Errorf("%w: %s: bad packed integer: %v", ErrInvalid, what, protowire.ParseError(n))
			}
			dst = append(dst, int64(v))
			b = b[n:]
		}
		return dst, nil
	}
	return nil, fmt.Errorf("%w: %s has wire type %d, want an integer list", ErrInvalid, what, f.Type)
}

// floats reads a repeated float field, packed or not, appending to dst.
func (f field) floats(dst []float32, what string, limit int) ([]float32, error) {
	switch f.Type {
	case protowire.Fixed32Type:
		return append(dst, math.Float32frombits(uint32(f.Int))), nil
	case protowire.BytesType:
		if len(f.Bytes)%4 != 0 {
			return nil, fmt.Errorf("%w: %s: packed floats of %d bytes, not a multiple of 4", ErrInvalid, what, len(f.Bytes))
		}
		if len(dst)+len(f.Bytes)/4 > limit {
			return nil, fmt.Errorf("%w: %s: more than %d values", ErrInvalid, what, limit)
		}
		for i := 0; i < len(f.Bytes); i += 4 {
			dst = append(dst, math.Float32frombits(binary.LittleEndian.Uint32(f.Bytes[i:])))
		}
		return dst, nil
	}
	return nil, fmt.Errorf("%w: %s has wire type %d, want a float list", ErrInvalid, what, f.Type)
}
