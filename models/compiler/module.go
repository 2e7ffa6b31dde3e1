package compiler

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/edgefleet/edgefleet/models/compiler/wasm"
)

// Memory layout of a compiled module:
//
//	[0, 16)              never handed out, so no valid pointer is 0
//	[16, staticEnd)      static data (metadata JSON, error messages, weights)
//	                     and per-row scratch buffers, in allocation order
//	[heapStart, ...)     ef_alloc's bump heap; memory grows on demand
//
// Only non-zero runs of the static image become data segments, so scratch
// costs no module bytes.
const staticBase = 16

// frameMagic is "EFT1" read as a little-endian u32.
const frameMagic = 0x31544645

// dtypeFP32 is the frame's code for FP32 (models/ABI.md).
const dtypeFP32 = 11

// ABI return codes (models/ABI.md).
const (
	codeBadInput       = -1
	codeOutputTooSmall = -2
)

// maxAlloc is the largest ef_alloc request served: comfortably above the
// 16 MiB frame cap, far below where 32-bit address arithmetic could wrap.
const maxAlloc = 1 << 30

var (
	i32  = []wasm.ValType{wasm.I32}
	f64  = []wasm.ValType{wasm.F64}
	none []wasm.ValType
)

// builder assembles one module: the wasm module, its static memory image and
// the shared helper functions.
type builder struct {
	mod    *wasm.Module
	static []byte // memory image from address 0

	errPtr, errLen, heap uint32 // globals

	expFn, softmaxFn *wasm.Func
	dotFns           map[int]*wasm.Func
}

func newBuilder() *builder {
	b := &builder{mod: &wasm.Module{}, static: make([]byte, staticBase)}
	b.errPtr = b.mod.AddGlobal(wasm.I32, true, 0)
	b.errLen = b.mod.AddGlobal(wasm.I32, true, 0)
	b.heap = b.mod.AddGlobal(wasm.I32, true, 0) // set in finish
	return b
}

// data places p in static memory at an address aligned to align and
// returns the address.
func (b *builder) data(p []byte, align int) uint32 {
	for len(b.static)%align != 0 {
		b.static = append(b.static, 0)
	}
	addr := uint32(len(b.static))
	b.static = append(b.static, p...)
	return addr
}

// scratch reserves n zeroed bytes aligned to 16.
func (b *builder) scratch(n int) uint32 {
	return b.data(make([]byte, n), 16)
}

// floats places v as little-endian float32s, 16-byte aligned.
func (b *builder) floats(v []float32) uint32 {
	p := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(p[4*i:], math.Float32bits(x))
	}
	return b.data(p, 16)
}

// message is an error message in static memory.
type message struct{ addr, n uint32 }

func (b *builder) message(s string) message {
	return message{b.data([]byte(s), 1), uint32(len(s))}
}

// fail emits: set the last error to msg and return code.
func (b *builder) fail(f *wasm.Func, msg message, code int32) {
	f.I32Const(int32(msg.addr))
	f.GlobalSet(b.errPtr)
	f.I32Const(int32(msg.n))
	f.GlobalSet(b.errLen)
	f.I32Const(code)
	f.Op(wasm.OpReturn)
}

// failIf emits: if the i32 on the stack is non-zero, fail.
func (b *builder) failIf(f *wasm.Func, msg message, code int32) {
	f.If(wasm.BlockEmpty)
	b.fail(f, msg, code)
	f.End()
}

// outputDecl is one output tensor of the module: width columns per row,
// rank 1 ([rows], only for width 1) or 2 ([rows, width]).
type outputDecl struct {
	name  string
	width int
	rank  int
}

// headerSize is the size of the output's tensor header in the frame.
func (o outputDecl) headerSize() int { return 2 + len(o.name) + 2 + 8*o.rank + 8 }

// abi describes what the ABI glue wraps: one FP32 input of shape
// [rows, features], some outputs, and the per-row function computing them.
type abi struct {
	inputName string
	features  int
	outputs   []outputDecl
	metadata  []byte
	// pages receives the module's initial memory size, in pages.
	pages *uint32
	// row is (inRow i32, outRow_0 i32, ..., outRow_k i32) -> (): it reads
	// one input row and writes each output's row.
	row *wasm.Func
}

// finish adds the ABI exports around a.row, lays out memory and returns
// the module's bytes.
func (b *builder) finish(a abi) []byte {
	m := b.mod
	m.ExportMemory("memory")

	f := m.NewFunc(none, i32)
	f.I32Const(1)
	m.ExportFunc("ef_abi_version", f)

	b.metadataFunc(a.metadata)
	b.lastErrorFunc()
	b.inferFunc(a)
	b.allocFunc()

	heapStart := (len(b.static) + 15) &^ 15
	m.SetGlobalInit(b.heap, int64(heapStart))
	// One page beyond the static image: the host's first buffers (a few
	// KiB in, 64 KiB out) then cost one memory.grow.
	pages := uint32(heapStart+0xFFFF)>>16 + 1
	m.SetMemory(pages)
	if a.pages != nil {
		*a.pages = pages
	}
	b.emitData()
	return m.Encode()
}

// emitData turns the static image into data segments, one per run of
// non-zero bytes; runs closer than 16 bytes are merged, since a segment
// header costs about that much.
func (b *builder) emitData() {
	img := b.static
	i := 0
	for i < len(img) {
		for i < len(img) && img[i] == 0 {
			i++
		}
		if i == len(img) {
			break
		}
		start, end := i, i
		for j := i; j < len(img); j++ {
			if img[j] != 0 {
				end = j + 1
			} else if j-end >= 16 {
				break
			}
		}
		b.mod.AddData(uint32(start), img[start:end])
		i = end
	}
}

// allocFunc emits ef_alloc(size) -> ptr: a bump allocator growing memory
// as needed, 0 when the request is too large or memory cannot grow.
func (b *builder) allocFunc() {
	f := b.mod.NewFunc(i32, i32)
	const size = 0
	p := f.Local(wasm.I32)
	end := f.Local(wasm.I64)
	have := f.Local(wasm.I64)

	f.LocalGet(size)
	f.I32Const(maxAlloc)
	f.Op(wasm.OpI32GtU)
	f.If(wasm.BlockEmpty)
	f.I32Const(0)
	f.Op(wasm.OpReturn)
	f.End()
	// p = (heap + 15) &^ 15
	f.GlobalGet(b.heap)
	f.I32Const(15)
	f.Op(wasm.OpI32Add)
	f.I32Const(-16)
	f.Op(wasm.OpI32And)
	f.LocalSet(p)
	// end = p + size, in 64 bits so nothing wraps.
	f.LocalGet(p)
	f.Op(wasm.OpI64ExtendI32U)
	f.LocalGet(size)
	f.Op(wasm.OpI64ExtendI32U)
	f.Op(wasm.OpI64Add)
	f.LocalSet(end)
	// have = memory.size << 16
	f.MemorySize()
	f.Op(wasm.OpI64ExtendI32U)
	f.I64Const(16)
	f.Op(wasm.OpI64Shl)
	f.LocalSet(have)
	f.LocalGet(end)
	f.LocalGet(have)
	f.Op(wasm.OpI64GtU)
	f.If(wasm.BlockEmpty)
	// grow by ceil((end - have) / 64 KiB) pages
	f.LocalGet(end)
	f.LocalGet(have)
	f.Op(wasm.OpI64Sub)
	f.I64Const(0xFFFF)
	f.Op(wasm.OpI64Add)
	f.I64Const(16)
	f.Op(wasm.OpI64ShrU)
	f.Op(wasm.OpI32WrapI64)
	f.MemoryGrow()
	f.I32Const(-1)
	f.Op(wasm.OpI32Eq)
	f.If(wasm.BlockEmpty)
	f.I32Const(0)
	f.Op(wasm.OpReturn)
	f.End()
	f.End()
	f.LocalGet(end)
	f.Op(wasm.OpI32WrapI64)
	f.GlobalSet(b.heap)
	f.LocalGet(p)
	b.mod.ExportFunc("ef_alloc", f)
}

// lastErrorFunc emits ef_last_error(out, cap) -> n.
func (b *builder) lastErrorFunc() {
	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.I32}, i32)
	const out, capacity = 0, 1
	n := f.Local(wasm.I32)
	// n = min(errLen, cap), unsigned
	f.GlobalGet(b.errLen)
	f.LocalGet(capacity)
	f.GlobalGet(b.errLen)
	f.LocalGet(capacity)
	f.Op(wasm.OpI32LtU)
	f.Op(wasm.OpSelect)
	f.LocalSet(n)
	f.LocalGet(out)
	f.GlobalGet(b.errPtr)
	f.LocalGet(n)
	f.MemoryCopy()
	f.LocalGet(n)
	b.mod.ExportFunc("ef_last_error", f)
}

// metadataFunc emits ef_metadata(out, cap) -> n, or -2 when cap is too
// small (writing the size needed, like ef_infer).
func (b *builder) metadataFunc(meta []byte) {
	addr := b.data(meta, 1)
	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.I32}, i32)
	const out, capacity = 0, 1
	f.LocalGet(capacity)
	f.I32Const(int32(len(meta)))
	f.Op(wasm.OpI32LtU)
	f.If(wasm.BlockEmpty)
	f.LocalGet(capacity)
	f.I32Const(4)
	f.Op(wasm.OpI32GeU)
	f.If(wasm.BlockEmpty)
	f.LocalGet(out)
	f.I32Const(int32(len(meta)))
	f.Mem(wasm.OpI32Store, 0, 0)
	f.End()
	f.I32Const(codeOutputTooSmall)
	f.Op(wasm.OpReturn)
	f.End()
	f.LocalGet(out)
	f.I32Const(int32(addr))
	f.I32Const(int32(len(meta)))
	f.MemoryCopy()
	f.I32Const(int32(len(meta)))
	b.mod.ExportFunc("ef_metadata", f)
}

// inferFunc emits ef_infer(in, inLen, out, outCap) -> n: it checks the
// input frame is exactly one FP32 tensor [rows, features] of the expected
// name, writes the output frame's headers, and calls the row function for
// every row.
func (b *builder) inferFunc(a abi) {
	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.I32, wasm.I32, wasm.I32}, i32)
	const in, inLen, out, outCap = 0, 1, 2, 3
	p := f.Local(wasm.I32)
	k := f.Local(wasm.I32)
	rows64 := f.Local(wasm.I64)
	rows := f.Local(wasm.I32)
	need := f.Local(wasm.I64)
	pos := f.Local(wasm.I32)
	inRow := f.Local(wasm.I32)
	outRows := make([]uint32, len(a.outputs))
	for j := range outRows {
		outRows[j] = f.Local(wasm.I32)
	}

	want := fmt.Sprintf("want one FP32 tensor %q of shape [rows, %d]", a.inputName, a.features)
	msgFrame := b.message("input frame is truncated or malformed; " + want)
	msgCount := b.message("input frame must hold exactly one tensor; " + want)
	msgName := b.message("input tensor has another name; " + want)
	msgType := b.message("input tensor is not FP32 of rank 2; " + want)
	msgWidth := b.message(fmt.Sprintf("input tensor does not have %d columns (features); %s", a.features, want))
	msgSmall := b.message("output buffer too small")
	nlen := int32(len(a.inputName))
	header := 36 + nlen // magic, count, name, dtype, rank, 2 dims, data length

	// The frame must at least hold the header; past this check every
	// header read is in bounds, so the remaining checks are computed
	// without branches (fewer blocks for the runtime's compiler to
	// allocate registers over, and a faster activation), the first
	// failing one choosing the message.
	f.LocalGet(inLen)
	f.I32Const(header)
	f.Op(wasm.OpI32LtU)
	b.failIf(f, msgFrame, codeBadInput)

	bad, msg, mlen := f.Local(wasm.I32), f.Local(wasm.I32), f.Local(wasm.I32)
	f.I32Const(0)
	f.LocalSet(bad)
	// check folds the i32 condition on the stack into bad, and makes m
	// the message when it holds; checks run last to first, so the first
	// failing one wins.
	type cond struct {
		m    message
		emit func()
	}
	var conds []cond
	add := func(m message, emit func()) { conds = append(conds, cond{m, emit}) }
	add(msgFrame, func() {
		f.LocalGet(in)
		f.Mem(wasm.OpI32Load, 0, 0)
		f.I32Const(frameMagic)
		f.Op(wasm.OpI32Ne)
	})
	add(msgCount, func() {
		f.LocalGet(in)
		f.Mem(wasm.OpI32Load, 0, 4)
		f.I32Const(1)
		f.Op(wasm.OpI32Ne)
	})
	add(msgName, func() {
		f.LocalGet(in)
		f.Mem(wasm.OpI32Load16U, 0, 8)
		f.I32Const(nlen)
		f.Op(wasm.OpI32Ne)
		// the name, 8 bytes at a time, then byte by byte
		i := 0
		for ; i+8 <= len(a.inputName); i += 8 {
			f.LocalGet(in)
			f.Mem(wasm.OpI64Load, 0, uint32(10+i))
			f.I64Const(int64(binary.LittleEndian.Uint64([]byte(a.inputName[i:]))))
			f.Op(wasm.OpI64Ne)
			f.Op(wasm.OpI32Or)
		}
		for ; i < len(a.inputName); i++ {
			f.LocalGet(in)
			f.Mem(wasm.OpI32Load8U, 0, uint32(10+i))
			f.I32Const(int32(a.inputName[i]))
			f.Op(wasm.OpI32Ne)
			f.Op(wasm.OpI32Or)
		}
	})
	add(msgType, func() {
		f.LocalGet(in)
		f.Mem(wasm.OpI32Load16U, 0, uint32(10+nlen))
		f.I32Const(dtypeFP32 | 2<<8) // dtype FP32, rank 2
		f.Op(wasm.OpI32Ne)
	})
	add(msgWidth, func() {
		f.LocalGet(in)
		f.Mem(wasm.OpI64Load, 0, uint32(10+nlen+10))
		f.I64Const(int64(a.features))
		f.Op(wasm.OpI64Ne)
	})
	add(msgFrame, func() {
		// data length = what is left of the frame = rows * features * 4;
		// rows is bounded by the frame's length first, so the product
		// cannot wrap.
		f.LocalGet(in)
		f.Mem(wasm.OpI64Load, 0, uint32(10+nlen+18))
		f.LocalGet(inLen)
		f.I32Const(header)
		f.Op(wasm.OpI32Sub)
		f.Op(wasm.OpI64ExtendI32U)
		f.Op(wasm.OpI64Ne)
		f.LocalGet(in)
		f.Mem(wasm.OpI64Load, 0, uint32(10+nlen+2))
		f.LocalTee(rows64)
		f.LocalGet(inLen)
		f.Op(wasm.OpI64ExtendI32U)
		f.Op(wasm.OpI64GtU)
		f.Op(wasm.OpI32Or)
		f.LocalGet(inLen)
		f.Op(wasm.OpI64ExtendI32U)
		f.LocalGet(rows64)
		f.LocalGet(rows64)
		f.LocalGet(inLen)
		f.Op(wasm.OpI64ExtendI32U)
		f.Op(wasm.OpI64GtU)
		f.Op(wasm.OpSelect) // min(rows, inLen): no wrap below
		f.I64Const(int64(4 * a.features))
		f.Op(wasm.OpI64Mul)
		f.LocalGet(inLen)
		f.I32Const(header)
		f.Op(wasm.OpI32Sub)
		f.Op(wasm.OpI64ExtendI32U)
		f.Op(wasm.OpI64Ne)
		f.Op(wasm.OpI32Or)
	})
	for i := len(conds) - 1; i >= 0; i-- {
		c := conds[i]
		c.emit()
		tmp := k
		f.LocalTee(tmp)
		f.LocalGet(bad)
		f.Op(wasm.OpI32Or)
		f.LocalSet(bad)
		for _, pair := range []struct {
			local, v uint32
		}{{msg, c.m.addr}, {mlen, c.m.n}} {
			f.I32Const(int32(pair.v))
			f.LocalGet(pair.local)
			f.LocalGet(tmp)
			f.Op(wasm.OpSelect)
			f.LocalSet(pair.local)
		}
	}
	f.LocalGet(bad)
	f.If(wasm.BlockEmpty)
	f.LocalGet(msg)
	f.GlobalSet(b.errPtr)
	f.LocalGet(mlen)
	f.GlobalSet(b.errLen)
	f.I32Const(codeBadInput)
	f.Op(wasm.OpReturn)
	f.End()
	f.LocalGet(rows64)
	f.Op(wasm.OpI32WrapI64)
	f.LocalSet(rows)
	// p = in + 10 + nlen: the dtype byte.
	f.LocalGet(in)
	f.I32Const(10 + nlen)
	f.Op(wasm.OpI32Add)
	f.LocalSet(p)

	// need = fixed headers + rows * 4 * sum(widths)
	fixed, perRow := 8, 0
	for _, o := range a.outputs {
		fixed += o.headerSize()
		perRow += 4 * o.width
	}
	f.LocalGet(rows64)
	f.I64Const(int64(perRow))
	f.Op(wasm.OpI64Mul)
	f.I64Const(int64(fixed))
	f.Op(wasm.OpI64Add)
	f.LocalTee(need)
	f.LocalGet(outCap)
	f.Op(wasm.OpI64ExtendI32U)
	f.Op(wasm.OpI64GtU)
	f.If(wasm.BlockEmpty)
	f.LocalGet(outCap)
	f.I32Const(4)
	f.Op(wasm.OpI32GeU)
	f.If(wasm.BlockEmpty)
	// the size needed, saturated to u32
	f.LocalGet(out)
	f.LocalGet(need)
	f.I64Const(0xFFFFFFFF)
	f.LocalGet(need)
	f.I64Const(0xFFFFFFFF)
	f.Op(wasm.OpI64LtU)
	f.Op(wasm.OpSelect)
	f.Op(wasm.OpI32WrapI64)
	f.Mem(wasm.OpI32Store, 0, 0)
	f.End()
	b.fail(f, msgSmall, codeOutputTooSmall)
	f.End()

	// Output frame headers.
	f.LocalGet(out)
	f.I32Const(frameMagic)
	f.Mem(wasm.OpI32Store, 0, 0)
	f.LocalGet(out)
	f.I32Const(int32(len(a.outputs)))
	f.Mem(wasm.OpI32Store, 0, 4)
	f.LocalGet(out)
	f.I32Const(8)
	f.Op(wasm.OpI32Add)
	f.LocalSet(pos)
	for j, o := range a.outputs {
		prefix := binary.LittleEndian.AppendUint16(nil, uint16(len(o.name)))
		prefix = append(prefix, o.name...)
		prefix = append(prefix, dtypeFP32, byte(o.rank))
		tmpl := b.data(prefix, 1)
		f.LocalGet(pos)
		f.I32Const(int32(tmpl))
		f.I32Const(int32(len(prefix)))
		f.MemoryCopy()
		off := uint32(len(prefix))
		f.LocalGet(pos)
		f.LocalGet(rows64)
		f.Mem(wasm.OpI64Store, 0, off)
		off += 8
		if o.rank == 2 {
			f.LocalGet(pos)
			f.I64Const(int64(o.width))
			f.Mem(wasm.OpI64Store, 0, off)
			off += 8
		}
		f.LocalGet(pos)
		f.LocalGet(rows64)
		f.I64Const(int64(4 * o.width))
		f.Op(wasm.OpI64Mul)
		f.Mem(wasm.OpI64Store, 0, off)
		off += 8
		// outRow_j = pos + off; pos = outRow_j + rows * 4 * width
		f.LocalGet(pos)
		f.I32Const(int32(off))
		f.Op(wasm.OpI32Add)
		f.LocalTee(outRows[j])
		f.LocalGet(rows)
		f.I32Const(int32(4 * o.width))
		f.Op(wasm.OpI32Mul)
		f.Op(wasm.OpI32Add)
		f.LocalSet(pos)
	}

	// The rows.
	f.LocalGet(p)
	f.I32Const(26)
	f.Op(wasm.OpI32Add)
	f.LocalSet(inRow)
	f.I32Const(0)
	f.LocalSet(k)
	f.Block(wasm.BlockEmpty)
	f.Loop(wasm.BlockEmpty)
	f.LocalGet(k)
	f.LocalGet(rows)
	f.Op(wasm.OpI32GeU)
	f.BrIf(1)
	f.LocalGet(inRow)
	for _, r := range outRows {
		f.LocalGet(r)
	}
	f.Call(a.row)
	f.LocalGet(inRow)
	f.I32Const(int32(4 * a.features))
	f.Op(wasm.OpI32Add)
	f.LocalSet(inRow)
	for j, r := range outRows {
		f.LocalGet(r)
		f.I32Const(int32(4 * a.outputs[j].width))
		f.Op(wasm.OpI32Add)
		f.LocalSet(r)
	}
	f.LocalGet(k)
	f.I32Const(1)
	f.Op(wasm.OpI32Add)
	f.LocalSet(k)
	f.Br(0)
	f.End()
	f.End()
	f.LocalGet(need)
	f.Op(wasm.OpI32WrapI64)
	b.mod.ExportFunc("ef_infer", f)
}
