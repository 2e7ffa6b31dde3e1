package tensor

import (
	"encoding/binary"
	"fmt"
)

// Frame layout (models/ABI.md), all integers little-endian:
//
//	"EFT1" | u32 count | count x ( u16 nameLen | name | u8 dtype | u8 rank |
//	                               rank x u64 dim | u64 dataLen | data )

// FrameMagic starts every tensor frame.
const FrameMagic = "EFT1"

// Frame size caps. Decoders check them before allocating.
const (
	// MaxFrame is the largest frame, in bytes, that EncodeFrame produces
	// and DecodeFrame accepts.
	MaxFrame = 16 << 20
	// MaxTensors is the most tensors one frame may carry.
	MaxTensors = 1024
)

// EncodeFrame encodes ts as one binary tensor frame.
func EncodeFrame(ts []Tensor) ([]byte, error) {
	return AppendFrame(nil, ts)
}

// FrameSize returns the encoded size of ts, without validating it.
func FrameSize(ts []Tensor) int {
	n := len(FrameMagic) + 4
	for _, t := range ts {
		n += 2 + len(t.Name) + 2 + 8*len(t.Shape) + 8 + len(t.Data)
	}
	return n
}

// AppendFrame appends the frame encoding ts to dst and returns the extended
// slice; it lets a caller reuse one buffer across calls. Every tensor is
// validated first, so a frame that encodes also decodes.
func AppendFrame(dst []byte, ts []Tensor) ([]byte, error) {
	if len(ts) > MaxTensors {
		return dst, fmt.Errorf("%w: %d tensors in one frame, over the limit of %d", ErrInvalid, len(ts), MaxTensors)
	}
	for i, t := range ts {
		if err := t.Validate(); err != nil {
			return dst, err
		}
		if err := uniqueName(ts[:i], t.Name); err != nil {
			return dst, err
		}
	}
	if size := FrameSize(ts); size > MaxFrame {
		return dst, fmt.Errorf("%w: frame of %d bytes is over the %d byte limit", ErrInvalid, size, MaxFrame)
	}
	dst = append(dst, FrameMagic...)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(ts)))
	for _, t := range ts {
		dst = binary.LittleEndian.AppendUint16(dst, uint16(len(t.Name)))
		dst = append(dst, t.Name...)
		dst = append(dst, byte(t.DType), byte(len(t.Shape)))
		for _, d := range t.Shape {
			dst = binary.LittleEndian.AppendUint64(dst, uint64(d))
		}
		dst = binary.LittleEndian.AppendUint64(dst, uint64(len(t.Data)))
		dst = append(dst, t.Data...)
	}
	return dst, nil
}

// frameReader walks a frame, failing on the first short read.
type frameReader struct {
	b   []byte
	off int
	err error
}

func (r *frameReader) take(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b)-r.off {
		r.err = fmt.Errorf("%w: frame truncated at byte %d reading %s (%d bytes wanted, %d left)", ErrInvalid, r.off, what, n, len(r.b)-r.off)
		return nil
	}
	p := r.b[r.off : r.off+n]
	r.off += n
	return p
}

func (r *frameReader) u8(what string) uint8 {
	if p := r.take(1, what); p != nil {
		return p[0]
	}
	return 0
}

func (r *frameReader) u16(what string) uint16 {
	if p := r.take(2, what); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (r *frameReader) u32(what string) uint32 {
	if p := r.take(4, what); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (r *frameReader) u64(what string) uint64 {
	if p := r.take(8, what); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

// DecodeFrame decodes a binary tensor frame. It is strict: the frame must be
// at most MaxFrame bytes, every length must be in bounds, every tensor's
// data length must equal its shape's element count times its dtype size,
// BOOL elements must be 0 or 1, and no bytes may follow the last tensor.
// The returned tensors' Data alias b; copy them if b is reused.
func DecodeFrame(b []byte) ([]Tensor, error) {
	if len(b) > MaxFrame {
		return nil, fmt.Errorf("%w: frame of %d bytes is over the %d byte limit", ErrInvalid, len(b), MaxFrame)
	}
	r := &frameReader{b: b}
	if m := r.take(len(FrameMagic), "magic"); r.err == nil && string(m) != FrameMagic {
		return nil, fmt.Errorf("%w: frame starts with %q, not %q: not a tensor frame", ErrInvalid, m, FrameMagic)
	}
	count := r.u32("tensor count")
	if r.err != nil {
		return nil, r.err
	}
	// Each tensor takes at least 12 bytes, which bounds count by the input
	// size before anything is allocated.
	if count > MaxTensors || int(count) > (len(b)-r.off)/12 {
		return nil, fmt.Errorf("%w: frame claims %d tensors, more than its %d bytes or the limit of %d allow", ErrInvalid, count, len(b), MaxTensors)
	}
	ts := make([]Tensor, 0, count)
	for i := 0; i < int(count); i++ {
		var t Tensor
		nameLen := int(r.u16("name length"))
		t.Name = string(r.take(nameLen, "name"))
		t.DType = DType(r.u8("dtype"))
		rank := int(r.u8("rank"))
		if r.err != nil {
			return nil, r.err
		}
		if rank > MaxRank {
			return nil, fmt.Errorf("%w: tensor %d (%q) has rank %d, over the limit of %d", ErrInvalid, i, t.Name, rank, MaxRank)
		}
		dims := r.take(8*rank, "shape")
		if r.err != nil {
			return nil, r.err
		}
		t.Shape = make([]int64, rank)
		for j := range t.Shape {
			d := binary.LittleEndian.Uint64(dims[8*j:])
			if d > MaxFrame {
				return nil, fmt.Errorf("%w: tensor %d (%q) dimension %d is %d, over the limit of %d", ErrInvalid, i, t.Name, j, d, MaxFrame)
			}
			t.Shape[j] = int64(d)
		}
		dataLen := r.u64("data length")
		if r.err != nil {
			return nil, r.err
		}
		if dataLen > uint64(len(b)-r.off) {
			return nil, fmt.Errorf("%w: tensor %d (%q) claims %d data bytes, only %d left in the frame", ErrInvalid, i, t.Name, dataLen, len(b)-r.off)
		}
		t.Data = r.take(int(dataLen), "data")
		if t.Data == nil {
			t.Data = []byte{}
		}
		if err := t.Validate(); err != nil {
			return nil, fmt.Errorf("frame tensor %d: %w", i, err)
		}
		if err := uniqueName(ts, t.Name); err != nil {
			return nil, err
		}
		ts = append(ts, t)
	}
	if r.off != len(b) {
		return nil, fmt.Errorf("%w: %d bytes after the last tensor of the frame", ErrInvalid, len(b)-r.off)
	}
	return ts, nil
}

// uniqueName refuses a second tensor of the same name: a model could not
// tell which one was meant. Frames hold few tensors, so a scan is cheap.
func uniqueName(seen []Tensor, name string) error {
	for _, s := range seen {
		if s.Name == name {
			return fmt.Errorf("%w: two tensors are named %q", ErrInvalid, name)
		}
	}
	return nil
}
