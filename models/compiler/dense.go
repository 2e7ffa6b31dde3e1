package compiler

import (
	"github.com/edgefleet/edgefleet/models/compiler/onnx"
	"github.com/edgefleet/edgefleet/models/compiler/wasm"
)

// Dense networks compile to code that walks weights held in the data
// section, so the module costs the weight bytes plus a few KiB of code per
// layer. Every value of the graph has a scratch row; a row runs the steps
// in order and copies the graph outputs out.
//
// The code has few loop iterations on purpose: the agent's runtime stops
// a guest at its deadline by checking, at the head of every loop
// iteration, whether to stop, and that check costs about as much as 30
// multiply-adds. So a dense layer computes denseRows outputs per iteration
// (independent sums the CPU overlaps) over denseUnroll inputs unrolled,
// and short element-wise steps are unrolled whole.
const (
	denseRows   = 4
	denseUnroll = 64
	// elemUnroll is the most elements an element-wise step unrolls whole;
	// longer ones loop over blocks of elemBlock.
	elemUnroll = 32
	elemBlock  = 16
)

// compileGraph emits the row function of a lowered ONNX graph.
func (b *builder) compileGraph(m *onnx.Model) *wasm.Func {
	addr := make([]uint32, len(m.Values))
	for i, v := range m.Values {
		if i != m.Input {
			addr[i] = b.scratch(4 * v.Width)
		}
	}
	params := make([]wasm.ValType, 1+len(m.Outputs))
	for i := range params {
		params[i] = wasm.I32
	}
	f := b.mod.NewFunc(params, none)
	const inRow = 0
	// push emits the address of value v.
	push := func(v int) {
		if v == m.Input {
			f.LocalGet(inRow)
		} else {
			f.I32Const(int32(addr[v]))
		}
	}
	for _, st := range m.Steps {
		width := m.Values[st.Out].Width
		switch st.Kind {
		case onnx.Dense:
			b.dense(f, st, push, m.Values[st.In].Width, width, addr[st.Out])
		case onnx.Softmax:
			in, out := f.Local(wasm.I32), f.Local(wasm.I32)
			push(st.In)
			f.LocalSet(in)
			f.I32Const(int32(addr[st.Out]))
			f.LocalSet(out)
			b.softmaxInline(f, in, out, width)
		default:
			b.elementwise(f, st, push, width, addr[st.Out])
		}
	}
	for j, o := range m.Outputs {
		f.LocalGet(uint32(1 + j))
		push(o)
		f.I32Const(int32(4 * m.Values[o].Width))
		f.MemoryCopy()
	}
	return f
}

// dense emits out[j] = f32(sum_i x[i]*W[j][i]) (*alpha) (+ bias[j]) for
// j < n, each sum in float64 in index order: every product of two float32s
// is exact in float64, so only the additions round, in the same order as
// the native evaluator's, which the module therefore matches bit for bit.
//
// The weights are stored in blocks of denseRows rows, interleaved, so that
// the weights of a block's rows for one input are 16 contiguous bytes: two
// SIMD lanes of float64 accumulators each take two rows. A block is one
// loop iteration whose inputs are covered by calls of the shared, unrolled
// dot functions (a call costs no deadline check), so the code of a layer
// is a few hundred bytes whatever its width.
func (b *builder) dense(f *wasm.Func, st onnx.Step, push func(int), k, n int, out uint32) {
	blocks := (n + denseRows - 1) / denseRows
	packed := make([]float32, blocks*denseRows*k) // rows past n stay zero
	for j := 0; j < n; j++ {
		for i := 0; i < k; i++ {
			packed[(j/denseRows*k+i)*denseRows+j%denseRows] = st.W[j*k+i]
		}
	}
	w := b.floats(packed)
	var bias uint32
	if st.Bias != nil {
		bias = b.floats(st.Bias)
	}
	x, wblk, yp := f.Local(wasm.I32), f.Local(wasm.I32), f.Local(wasm.I32)
	a01, a23 := f.Local(wasm.V128), f.Local(wasm.V128)
	push(st.In)
	f.LocalSet(x)
	f.I32Const(int32(w))
	f.LocalSet(wblk)
	f.I32Const(int32(out))
	f.LocalSet(yp)

	// block computes rows outputs at yp from the weight block at wblk,
	// then advances yp and wblk.
	block := func(rows int) {
		f.V128Zero()
		f.LocalSet(a01)
		f.V128Zero()
		f.LocalSet(a23)
		for off := 0; off < k; {
			c := denseUnroll
			for c > k-off {
				c /= 2
			}
			for _, p := range []struct {
				local uint32
				scale int
			}{{x, 4}, {wblk, 4 * denseRows}} {
				f.LocalGet(p.local)
				if off > 0 {
					f.I32Const(int32(p.scale * off))
					f.Op(wasm.OpI32Add)
				}
			}
			f.LocalGet(a01)
			f.LocalGet(a23)
			f.Call(b.dot(c))
			f.LocalSet(a23)
			f.LocalSet(a01)
			off += c
		}
		for r := 0; r < rows; r++ {
			f.LocalGet(yp)
			f.LocalGet([]uint32{a01, a23}[r/2])
			f.VecLane(wasm.VecF64x2ExtractLane, byte(r%2))
			f.Op(wasm.OpF32DemoteF64)
			if st.Alpha != 1 {
				f.F32Const(st.Alpha)
				f.Op(wasm.OpF32Mul)
			}
			if st.Bias != nil {
				f.LocalGet(yp)
				f.Mem(wasm.OpF32Load, 2, bias-out+uint32(4*r))
				f.Op(wasm.OpF32Add)
			}
			f.Mem(wasm.OpF32Store, 2, uint32(4*r))
		}
		f.LocalGet(yp)
		f.I32Const(int32(4 * rows))
		f.Op(wasm.OpI32Add)
		f.LocalSet(yp)
		f.LocalGet(wblk)
		f.I32Const(int32(4 * denseRows * k))
		f.Op(wasm.OpI32Add)
		f.LocalSet(wblk)
	}
	if full := n / denseRows; full == 1 {
		block(denseRows)
	} else if full > 1 {
		f.Loop(wasm.BlockEmpty)
		block(denseRows)
		f.LocalGet(yp)
		f.I32Const(int32(out) + int32(4*denseRows*full))
		f.Op(wasm.OpI32LtU)
		f.BrIf(0)
		f.End()
	}
	if rem := n % denseRows; rem > 0 {
		block(rem)
	}
}

// dot returns the function dot_c(x, w i32, a01, a23 v128) -> (a01, a23
// v128): for i < c, in order, it adds x[i]*w[i][r] to lane r%2 of a01 (rows
// 0, 1) or a23 (rows 2, 3), in float64; w holds denseRows float32s per
// input. c is a power of two up to denseUnroll. Emitted once per c, shared
// by all layers.
func (b *builder) dot(c int) *wasm.Func {
	if fn, ok := b.dotFns[c]; ok {
		return fn
	}
	v := []wasm.ValType{wasm.V128, wasm.V128}
	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.I32, wasm.V128, wasm.V128}, v)
	if b.dotFns == nil {
		b.dotFns = map[int]*wasm.Func{}
	}
	b.dotFns[c] = f
	const x, w, a01, a23 = 0, 1, 2, 3
	xv := f.Local(wasm.V128)
	for i := 0; i < c; i++ {
		f.LocalGet(x)
		f.Mem(wasm.OpF32Load, 2, uint32(4*i))
		f.Op(wasm.OpF64PromoteF32)
		f.Vec(wasm.VecF64x2Splat)
		f.LocalSet(xv)
		for h, acc := range []uint32{a01, a23} {
			f.LocalGet(acc)
			f.LocalGet(xv)
			f.LocalGet(w)
			f.VecMem(wasm.VecV128Load64Zero, 3, uint32(4*denseRows*i+8*h))
			f.Vec(wasm.VecF64x2PromoteLowF4)
			f.Vec(wasm.VecF64x2Mul)
			f.Vec(wasm.VecF64x2Add)
			f.LocalSet(acc)
		}
	}
	f.LocalGet(a01)
	f.LocalGet(a23)
	return f
}

// elementwise emits the one-input (or two-input) element-by-element steps,
// unrolled whole up to elemUnroll elements, else in blocks of elemBlock.
func (b *builder) elementwise(f *wasm.Func, st onnx.Step, push func(int), n int, out uint32) {
	var c uint32
	if st.Kind == onnx.AddConst {
		c = b.floats(st.C)
	}
	in, in2, j, x := f.Local(wasm.I32), f.Local(wasm.I32), f.Local(wasm.I32), f.Local(wasm.F32)
	push(st.In)
	f.LocalSet(in)
	if st.Kind == onnx.AddValues {
		push(st.In2)
		f.LocalSet(in2)
	}
	// one emits element j*4+off: out[..] = op(in[..]).
	one := func(off uint32) {
		f.LocalGet(j)
		f.LocalGet(in)
		f.Op(wasm.OpI32Add)
		f.Mem(wasm.OpF32Load, 2, off)
		switch st.Kind {
		case onnx.AddConst:
			f.LocalGet(j)
			f.Mem(wasm.OpF32Load, 2, c+off)
			f.Op(wasm.OpF32Add)
		case onnx.AddValues:
			f.LocalGet(j)
			f.LocalGet(in2)
			f.Op(wasm.OpI32Add)
			f.Mem(wasm.OpF32Load, 2, off)
			f.Op(wasm.OpF32Add)
		case onnx.Relu:
			// x < 0 ? 0 : x, so NaN stays NaN as in the reference.
			f.LocalSet(x)
			f.F32Const(0)
			f.LocalGet(x)
			f.LocalGet(x)
			f.F32Const(0)
			f.Op(wasm.OpF32Lt)
			f.Op(wasm.OpSelect)
		case onnx.Sigmoid:
			b.sigmoid(f)
		case onnx.Tanh:
			b.tanh(f)
		}
		f.LocalSet(x)
		f.LocalGet(j)
		f.LocalGet(x)
		f.Mem(wasm.OpF32Store, 2, out+off)
	}
	f.I32Const(0)
	f.LocalSet(j)
	if n <= elemUnroll {
		for e := 0; e < n; e++ {
			one(uint32(4 * e))
		}
		return
	}
	blocks := n / elemBlock
	f.Loop(wasm.BlockEmpty)
	for e := 0; e < elemBlock; e++ {
		one(uint32(4 * e))
	}
	f.LocalGet(j)
	f.I32Const(4 * elemBlock)
	f.Op(wasm.OpI32Add)
	f.LocalTee(j)
	f.I32Const(int32(4 * elemBlock * blocks))
	f.Op(wasm.OpI32LtU)
	f.BrIf(0)
	f.End()
	for e := 0; e < n%elemBlock; e++ {
		one(uint32(4 * e))
	}
}
