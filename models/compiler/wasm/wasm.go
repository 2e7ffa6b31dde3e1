// Package wasm writes WebAssembly modules in the binary format: just what
// the model compiler needs (functions, one memory, globals, exports, active
// data segments) and an instruction emitter. It does not validate: the
// compiler's tests compile every module it writes with wazero, whose
// validator is the judge.
package wasm

import (
	"encoding/binary"
	"math"
)

// ValType is a WebAssembly value type.
type ValType byte

// Value types.
const (
	I32 ValType = 0x7F
	I64 ValType = 0x7E
	F32 ValType = 0x7D
	F64 ValType = 0x7C
	// V128 is the SIMD vector type (core 2.0).
	V128 ValType = 0x7B
)

// BlockEmpty is the block type of a block, loop or if without a result.
const BlockEmpty = 0x40

// Section ids, in the order they must appear.
const (
	secType   = 1
	secFunc   = 3
	secMemory = 5
	secGlobal = 6
	secExport = 7
	secCode   = 10
	secData   = 11
)

// Export kinds.
const (
	exportFunc   = 0
	exportMemory = 2
)

type funcType struct {
	params, results []ValType
}

func (t funcType) equal(o funcType) bool {
	return string(valBytes(t.params)) == string(valBytes(o.params)) && string(valBytes(t.results)) == string(valBytes(o.results))
}

func valBytes(ts []ValType) []byte {
	b := make([]byte, len(ts))
	for i, t := range ts {
		b[i] = byte(t)
	}
	return b
}

type global struct {
	typ     ValType
	mutable bool
	init    int64
}

type export struct {
	name  string
	kind  byte
	index uint32
}

type data struct {
	offset uint32
	bytes  []byte
}

// Module is a module being written. Functions get their indices in the
// order they are created, so one may call a function defined later.
type Module struct {
	types   []funcType
	funcs   []*Func
	memMin  uint32
	globals []global
	exports []export
	data    []data
}

// SetMemory gives the module one memory of min pages (64 KiB each) and no
// maximum: the host sets the limit.
func (m *Module) SetMemory(minPages uint32) { m.memMin = minPages }

// AddGlobal adds a global of type t initialised to init (an integer type)
// and returns its index.
func (m *Module) AddGlobal(t ValType, mutable bool, init int64) uint32 {
	m.globals = append(m.globals, global{t, mutable, init})
	return uint32(len(m.globals) - 1)
}

// SetGlobalInit changes the initial value of global i, for values known
// only once the rest of the module is written (such as where the heap
// starts).
func (m *Module) SetGlobalInit(i uint32, init int64) { m.globals[i].init = init }

// AddData places b at offset in memory when the module is instantiated.
func (m *Module) AddData(offset uint32, b []byte) {
	m.data = append(m.data, data{offset, b})
}

// ExportMemory exports the memory under name.
func (m *Module) ExportMemory(name string) {
	m.exports = append(m.exports, export{name, exportMemory, 0})
}

// ExportFunc exports f under name.
func (m *Module) ExportFunc(name string, f *Func) {
	m.exports = append(m.exports, export{name, exportFunc, f.Index})
}

// NewFunc adds a function with the given signature and returns it for its
// body to be written.
func (m *Module) NewFunc(params, results []ValType) *Func {
	t := funcType{params, results}
	ti := -1
	for i, o := range m.types {
		if o.equal(t) {
			ti = i
			break
		}
	}
	if ti < 0 {
		m.types = append(m.types, t)
		ti = len(m.types) - 1
	}
	f := &Func{Index: uint32(len(m.funcs)), typeIndex: uint32(ti), nparams: uint32(len(params))}
	m.funcs = append(m.funcs, f)
	return f
}

// Encode returns the module's binary form.
func (m *Module) Encode() []byte {
	out := []byte{0x00, 'a', 's', 'm', 0x01, 0x00, 0x00, 0x00}

	var s []byte
	s = U32(s, uint32(len(m.types)))
	for _, t := range m.types {
		s = append(s, 0x60)
		s = U32(s, uint32(len(t.params)))
		s = append(s, valBytes(t.params)...)
		s = U32(s, uint32(len(t.results)))
		s = append(s, valBytes(t.results)...)
	}
	out = section(out, secType, s)

	s = U32(nil, uint32(len(m.funcs)))
	for _, f := range m.funcs {
		s = U32(s, f.typeIndex)
	}
	out = section(out, secFunc, s)

	s = []byte{1, 0x00}
	s = U32(s, m.memMin)
	out = section(out, secMemory, s)

	if len(m.globals) > 0 {
		s = U32(nil, uint32(len(m.globals)))
		for _, g := range m.globals {
			mut := byte(0)
			if g.mutable {
				mut = 1
			}
			s = append(s, byte(g.typ), mut)
			switch g.typ {
			case I64:
				s = append(s, OpI64Const)
			default:
				s = append(s, OpI32Const)
			}
			s = S64(s, g.init)
			s = append(s, OpEnd)
		}
		out = section(out, secGlobal, s)
	}

	s = U32(nil, uint32(len(m.exports)))
	for _, e := range m.exports {
		s = Name(s, e.name)
		s = append(s, e.kind)
		s = U32(s, e.index)
	}
	out = section(out, secExport, s)

	s = U32(nil, uint32(len(m.funcs)))
	for _, f := range m.funcs {
		body := f.encodeLocals()
		body = append(body, f.code...)
		body = append(body, OpEnd)
		s = U32(s, uint32(len(body)))
		s = append(s, body...)
	}
	out = section(out, secCode, s)

	if len(m.data) > 0 {
		s = U32(nil, uint32(len(m.data)))
		for _, d := range m.data {
			s = append(s, 0x00, OpI32Const)
			s = S64(s, int64(int32(d.offset)))
			s = append(s, OpEnd)
			s = U32(s, uint32(len(d.bytes)))
			s = append(s, d.bytes...)
		}
		out = section(out, secData, s)
	}
	return out
}

func section(out []byte, id byte, body []byte) []byte {
	out = append(out, id)
	out = U32(out, uint32(len(body)))
	return append(out, body...)
}

// U32 appends v as unsigned LEB128.
func U32(b []byte, v uint32) []byte {
	for {
		c := byte(v & 0x7F)
		v >>= 7
		if v == 0 {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}

// S64 appends v as signed LEB128 (also right for i32 immediates).
func S64(b []byte, v int64) []byte {
	for {
		c := byte(v & 0x7F)
		v >>= 7
		if (v == 0 && c&0x40 == 0) || (v == -1 && c&0x40 != 0) {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}

// Name appends a length-prefixed UTF-8 name.
func Name(b []byte, s string) []byte {
	b = U32(b, uint32(len(s)))
	return append(b, s...)
}

// Func is a function being written: its locals and its body. The methods
// append one instruction each; the final `end` is added by Encode.
type Func struct {
	// Index is the function's index, for calls and exports.
	Index     uint32
	typeIndex uint32
	nparams   uint32
	locals    []ValType
	code      []byte
}

// Local adds a local of type t and returns its index (after the params).
func (f *Func) Local(t ValType) uint32 {
	f.locals = append(f.locals, t)
	return f.nparams + uint32(len(f.locals)-1)
}

// Size returns the body's size so far, in bytes.
func (f *Func) Size() int { return len(f.code) }

func (f *Func) encodeLocals() []byte {
	// Runs of the same type share one entry.
	type run struct {
		n uint32
		t ValType
	}
	var runs []run
	for _, t := range f.locals {
		if n := len(runs); n > 0 && runs[n-1].t == t {
			runs[n-1].n++
			continue
		}
		runs = append(runs, run{1, t})
	}
	b := U32(nil, uint32(len(runs)))
	for _, r := range runs {
		b = U32(b, r.n)
		b = append(b, byte(r.t))
	}
	return b
}

// Op appends instructions without immediates (see the Op constants).
func (f *Func) Op(ops ...byte) { f.code = append(f.code, ops...) }

// I32Const appends i32.const v.
func (f *Func) I32Const(v int32) {
	f.code = append(f.code, OpI32Const)
	f.code = S64(f.code, int64(v))
}

// I64Const appends i64.const v.
func (f *Func) I64Const(v int64) {
	f.code = append(f.code, OpI64Const)
	f.code = S64(f.code, v)
}

// F32Const appends f32.const v.
func (f *Func) F32Const(v float32) {
	f.code = append(f.code, OpF32Const)
	f.code = binary.LittleEndian.AppendUint32(f.code, math.Float32bits(v))
}

// F64Const appends f64.const v.
func (f *Func) F64Const(v float64) {
	f.code = append(f.code, OpF64Const)
	f.code = binary.LittleEndian.AppendUint64(f.code, math.Float64bits(v))
}

// LocalGet appends local.get i.
func (f *Func) LocalGet(i uint32) { f.code = U32(append(f.code, OpLocalGet), i) }

// LocalSet appends local.set i.
func (f *Func) LocalSet(i uint32) { f.code = U32(append(f.code, OpLocalSet), i) }

// LocalTee appends local.tee i.
func (f *Func) LocalTee(i uint32) { f.code = U32(append(f.code, OpLocalTee), i) }

// GlobalGet appends global.get i.
func (f *Func) GlobalGet(i uint32) { f.code = U32(append(f.code, OpGlobalGet), i) }

// GlobalSet appends global.set i.
func (f *Func) GlobalSet(i uint32) { f.code = U32(append(f.code, OpGlobalSet), i) }

// Call appends call g.
func (f *Func) Call(g *Func) { f.code = U32(append(f.code, OpCall), g.Index) }

// Mem appends a load or store op with its alignment (log2 of bytes) and
// constant offset.
func (f *Func) Mem(op byte, alignLog2, offset uint32) {
	f.code = append(f.code, op)
	f.code = U32(f.code, alignLog2)
	f.code = U32(f.code, offset)
}

// Block appends block with type bt (BlockEmpty or a ValType).
func (f *Func) Block(bt byte) { f.code = append(f.code, OpBlock, bt) }

// Loop appends loop with type bt.
func (f *Func) Loop(bt byte) { f.code = append(f.code, OpLoop, bt) }

// If appends if with type bt.
func (f *Func) If(bt byte) { f.code = append(f.code, OpIf, bt) }

// Else appends else.
func (f *Func) Else() { f.code = append(f.code, OpElse) }

// End appends end (of a block, loop or if).
func (f *Func) End() { f.code = append(f.code, OpEnd) }

// Br appends br depth.
func (f *Func) Br(depth uint32) { f.code = U32(append(f.code, OpBr), depth) }

// BrIf appends br_if depth.
func (f *Func) BrIf(depth uint32) { f.code = U32(append(f.code, OpBrIf), depth) }

// MemoryCopy appends memory.copy (dst, src, n on the stack).
func (f *Func) MemoryCopy() { f.code = append(f.code, 0xFC, 10, 0x00, 0x00) }

// MemoryFill appends memory.fill (dst, byte, n on the stack).
func (f *Func) MemoryFill() { f.code = append(f.code, 0xFC, 11, 0x00) }

// MemorySize appends memory.size.
func (f *Func) MemorySize() { f.code = append(f.code, 0x3F, 0x00) }

// MemoryGrow appends memory.grow.
func (f *Func) MemoryGrow() { f.code = append(f.code, 0x40, 0x00) }

// Vec appends a SIMD instruction without immediates (see the Vec
// constants).
func (f *Func) Vec(op uint32) {
	f.code = append(f.code, vecPrefix)
	f.code = U32(f.code, op)
}

// VecMem appends a SIMD load or store with its alignment and offset.
func (f *Func) VecMem(op, alignLog2, offset uint32) {
	f.Vec(op)
	f.code = U32(f.code, alignLog2)
	f.code = U32(f.code, offset)
}

// VecLane appends a SIMD lane instruction with its lane index.
func (f *Func) VecLane(op uint32, lane byte) {
	f.Vec(op)
	f.code = append(f.code, lane)
}

// V128Zero appends v128.const of all zero bits.
func (f *Func) V128Zero() {
	f.Vec(VecV128Const)
	f.code = append(f.code, make([]byte, 16)...)
}

const vecPrefix = 0xFD

// SIMD opcodes (after the 0xFD prefix).
const (
	VecV128Load          = 0x00
	VecV128Const         = 0x0C
	VecF64x2Splat        = 0x14
	VecF64x2ExtractLane  = 0x21
	VecV128Load64Zero    = 0x5D
	VecF64x2PromoteLowF4 = 0x5F
	VecF64x2Add          = 0xF0
	VecF64x2Mul          = 0xF2
)

// Opcodes, named as in the specification with the dot dropped.
const (
	OpUnreachable = 0x00
	OpBlock       = 0x02
	OpLoop        = 0x03
	OpIf          = 0x04
	OpElse        = 0x05
	OpEnd         = 0x0B
	OpBr          = 0x0C
	OpBrIf        = 0x0D
	OpReturn      = 0x0F
	OpCall        = 0x10
	OpDrop        = 0x1A
	OpSelect      = 0x1B
	OpLocalGet    = 0x20
	OpLocalSet    = 0x21
	OpLocalTee    = 0x22
	OpGlobalGet   = 0x23
	OpGlobalSet   = 0x24

	OpI32Load    = 0x28
	OpI64Load    = 0x29
	OpF32Load    = 0x2A
	OpF64Load    = 0x2B
	OpI32Load8U  = 0x2D
	OpI32Load16U = 0x2F
	OpI32Store   = 0x36
	OpI64Store   = 0x37
	OpF32Store   = 0x38
	OpF64Store   = 0x39
	OpI32Store8  = 0x3A
	OpI32Store16 = 0x3B

	OpI32Const = 0x41
	OpI64Const = 0x42
	OpF32Const = 0x43
	OpF64Const = 0x44

	OpI32Eqz = 0x45
	OpI32Eq  = 0x46
	OpI32Ne  = 0x47
	OpI32LtS = 0x48
	OpI32LtU = 0x49
	OpI32GtS = 0x4A
	OpI32GtU = 0x4B
	OpI32LeU = 0x4D
	OpI32GeS = 0x4E
	OpI32GeU = 0x4F
	OpI64Eqz = 0x50
	OpI64Eq  = 0x51
	OpI64Ne  = 0x52
	OpI64LtU = 0x54
	OpI64GtU = 0x56
	OpI64LeU = 0x58
	OpI64GeU = 0x5A
	OpF32Eq  = 0x5B
	OpF32Ne  = 0x5C
	OpF32Lt  = 0x5D
	OpF32Gt  = 0x5E
	OpF32Le  = 0x5F
	OpF32Ge  = 0x60
	OpF64Eq  = 0x61
	OpF64Ne  = 0x62
	OpF64Lt  = 0x63
	OpF64Gt  = 0x64
	OpF64Le  = 0x65
	OpF64Ge  = 0x66

	OpI32Add  = 0x6A
	OpI32Sub  = 0x6B
	OpI32Mul  = 0x6C
	OpI32DivU = 0x6E
	OpI32And  = 0x71
	OpI32Or   = 0x72
	OpI32Shl  = 0x74
	OpI32ShrU = 0x76
	OpI64Add  = 0x7C
	OpI64Sub  = 0x7D
	OpI64Mul  = 0x7E
	OpI64DivU = 0x80
	OpI64Shl  = 0x86
	OpI64ShrU = 0x88

	OpF32Abs  = 0x8B
	OpF32Neg  = 0x8C
	OpF32Add  = 0x92
	OpF32Sub  = 0x93
	OpF32Mul  = 0x94
	OpF32Div  = 0x95
	OpF32Min  = 0x96
	OpF32Max  = 0x97
	OpF64Abs  = 0x99
	OpF64Neg  = 0x9A
	OpF64Near = 0x9E
	OpF64Sqrt = 0x9F
	OpF64Add  = 0xA0
	OpF64Sub  = 0xA1
	OpF64Mul  = 0xA2
	OpF64Div  = 0xA3
	OpF64Min  = 0xA4
	OpF64Max  = 0xA5

	OpI32WrapI64     = 0xA7
	OpI32TruncF64S   = 0xAA
	OpI64ExtendI32S  = 0xAC
	OpI64ExtendI32U  = 0xAD
	OpI64TruncF64S   = 0xB0
	OpF32DemoteF64   = 0xB6
	OpF64ConvertI32S = 0xB7
	OpF64ConvertI64S = 0xB9
	OpF64PromoteF32  = 0xBB
	OpI64ReinterpF64 = 0xBD
	OpF64ReinterpI64 = 0xBF
)
