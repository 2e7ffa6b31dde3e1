package compiler

import (
	"math"

	"github.com/edgefleet/edgefleet/models/compiler/wasm"
)

// WebAssembly has no transcendental functions; the modules carry their own.
// They compute in float64 and the results are rounded to float32, so an
// error of a few float64 ulps never shows.

// expCoeffs are 1/k! for k = 0..12: the Taylor series of exp on
// |r| <= ln2/2, where the first omitted term is below 2e-15 relative.
var expCoeffs = func() []float64 {
	c := make([]float64, 13)
	f := 1.0
	for k := range c {
		if k > 0 {
			f *= float64(k)
		}
		c[k] = 1 / f
	}
	return c
}()

// exp returns the function exp(x f64) -> f64, emitting it on first use.
//
// x = k*ln2 + r with k = nearest(x/ln2) and ln2 split into a high part
// exact in k*ln2Hi and a low part, then exp(x) = 2^k * P(r); 2^k is built
// from its exponent bits in two halves so that subnormal results and
// k = 1024 work.
func (b *builder) exp() *wasm.Func {
	if b.expFn != nil {
		return b.expFn
	}
	f := b.mod.NewFunc(f64, f64)
	b.expFn = f
	const x = 0
	k := f.Local(wasm.F64)
	r := f.Local(wasm.F64)
	p := f.Local(wasm.F64)
	k1 := f.Local(wasm.I64)
	const (
		ln2Hi = 6.93147180369123816490e-01
		ln2Lo = 1.90821492927058770002e-10
	)
	// NaN stays NaN.
	f.LocalGet(x)
	f.LocalGet(x)
	f.Op(wasm.OpF64Ne)
	f.If(wasm.BlockEmpty)
	f.LocalGet(x)
	f.Op(wasm.OpReturn)
	f.End()
	f.LocalGet(x)
	f.F64Const(709.782712893384)
	f.Op(wasm.OpF64Gt)
	f.If(wasm.BlockEmpty)
	f.F64Const(math.Inf(1))
	f.Op(wasm.OpReturn)
	f.End()
	f.LocalGet(x)
	f.F64Const(-745.2)
	f.Op(wasm.OpF64Lt)
	f.If(wasm.BlockEmpty)
	f.F64Const(0)
	f.Op(wasm.OpReturn)
	f.End()
	// k = nearest(x / ln2); r = x - k*ln2Hi - k*ln2Lo
	f.LocalGet(x)
	f.F64Const(1 / math.Ln2)
	f.Op(wasm.OpF64Mul)
	f.Op(wasm.OpF64Near)
	f.LocalSet(k)
	f.LocalGet(x)
	f.LocalGet(k)
	f.F64Const(ln2Hi)
	f.Op(wasm.OpF64Mul)
	f.Op(wasm.OpF64Sub)
	f.LocalGet(k)
	f.F64Const(ln2Lo)
	f.Op(wasm.OpF64Mul)
	f.Op(wasm.OpF64Sub)
	f.LocalSet(r)
	// p = Horner(r)
	f.F64Const(expCoeffs[len(expCoeffs)-1])
	for i := len(expCoeffs) - 2; i >= 0; i-- {
		f.LocalGet(r)
		f.Op(wasm.OpF64Mul)
		f.F64Const(expCoeffs[i])
		f.Op(wasm.OpF64Add)
	}
	f.LocalSet(p)
	// k1 = trunc(k/2); result = p * 2^k1 * 2^(k-k1); both halves are
	// within the normal exponent range for every k reached here.
	f.LocalGet(k)
	f.Op(wasm.OpI64TruncF64S)
	f.I64Const(1)
	f.Op(0x87) // i64.shr_s
	f.LocalSet(k1)
	f.LocalGet(p)
	f.LocalGet(k1)
	b.pow2(f)
	f.Op(wasm.OpF64Mul)
	f.LocalGet(k)
	f.Op(wasm.OpI64TruncF64S)
	f.LocalGet(k1)
	f.Op(wasm.OpI64Sub)
	b.pow2(f)
	f.Op(wasm.OpF64Mul)
	return f
}

// pow2 emits: i64 n on the stack -> f64 2^n, for -1022 <= n <= 1023.
func (b *builder) pow2(f *wasm.Func) {
	f.I64Const(1023)
	f.Op(wasm.OpI64Add)
	f.I64Const(52)
	f.Op(wasm.OpI64Shl)
	f.Op(wasm.OpF64ReinterpI64)
}

// sigmoid emits: f32 on the stack -> f32 1/(1+exp(-x)), computed in float64.
func (b *builder) sigmoid(f *wasm.Func) {
	exp := b.exp()
	f.Op(wasm.OpF64PromoteF32)
	f.Op(wasm.OpF64Neg)
	f.Call(exp)
	f.F64Const(1)
	f.Op(wasm.OpF64Add)
	tmp := f.Local(wasm.F64)
	f.LocalSet(tmp)
	f.F64Const(1)
	f.LocalGet(tmp)
	f.Op(wasm.OpF64Div)
	f.Op(wasm.OpF32DemoteF64)
}

// tanh emits: f32 on the stack -> f32 tanh(x), computed in float64 as
// sign(x) * (1 - e)/(1 + e) with e = exp(-2|x|), which never overflows.
func (b *builder) tanh(f *wasm.Func) {
	exp := b.exp()
	x := f.Local(wasm.F64)
	e := f.Local(wasm.F64)
	f.Op(wasm.OpF64PromoteF32)
	f.LocalTee(x)
	f.Op(wasm.OpF64Abs)
	f.F64Const(-2)
	f.Op(wasm.OpF64Mul)
	f.Call(exp)
	f.LocalSet(e)
	f.F64Const(1)
	f.LocalGet(e)
	f.Op(wasm.OpF64Sub)
	f.F64Const(1)
	f.LocalGet(e)
	f.Op(wasm.OpF64Add)
	f.Op(wasm.OpF64Div)
	f.LocalGet(x)
	f.Op(0xA6) // f64.copysign
	f.Op(wasm.OpF32DemoteF64)
}

// softmax returns the function softmax(in i32, out i32, n i32, tmp i32):
// out[0:n] = softmax(in[0:n]) over float32s, computed in float64 with tmp
// holding n float64s. in and out may be the same.
func (b *builder) softmax() *wasm.Func {
	if b.softmaxFn != nil {
		return b.softmaxFn
	}
	exp := b.exp()
	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.I32, wasm.I32, wasm.I32}, none)
	b.softmaxFn = f
	const in, out, n, tmp = 0, 1, 2, 3
	i := f.Local(wasm.I32)
	mx := f.Local(wasm.F64)
	sum := f.Local(wasm.F64)
	e := f.Local(wasm.F64)

	loop := func(body func()) {
		f.I32Const(0)
		f.LocalSet(i)
		f.Loop(wasm.BlockEmpty)
		body()
		f.LocalGet(i)
		f.I32Const(1)
		f.Op(wasm.OpI32Add)
		f.LocalTee(i)
		f.LocalGet(n)
		f.Op(wasm.OpI32LtU)
		f.BrIf(0)
		f.End()
	}
	addr := func(base uint32, size int32) {
		f.LocalGet(base)
		f.LocalGet(i)
		f.I32Const(size)
		f.Op(wasm.OpI32Mul)
		f.Op(wasm.OpI32Add)
	}
	f.F64Const(math.Inf(-1))
	f.LocalSet(mx)
	loop(func() {
		f.LocalGet(mx)
		addr(in, 4)
		f.Mem(wasm.OpF32Load, 2, 0)
		f.Op(wasm.OpF64PromoteF32)
		f.Op(wasm.OpF64Max)
		f.LocalSet(mx)
	})
	f.F64Const(0)
	f.LocalSet(sum)
	loop(func() {
		addr(tmp, 8)
		addr(in, 4)
		f.Mem(wasm.OpF32Load, 2, 0)
		f.Op(wasm.OpF64PromoteF32)
		f.LocalGet(mx)
		f.Op(wasm.OpF64Sub)
		f.Call(exp)
		f.LocalTee(e)
		f.Mem(wasm.OpF64Store, 3, 0)
		f.LocalGet(sum)
		f.LocalGet(e)
		f.Op(wasm.OpF64Add)
		f.LocalSet(sum)
	})
	loop(func() {
		addr(out, 4)
		addr(tmp, 8)
		f.Mem(wasm.OpF64Load, 3, 0)
		f.LocalGet(sum)
		f.Op(wasm.OpF64Div)
		f.Op(wasm.OpF32DemoteF64)
		f.Mem(wasm.OpF32Store, 2, 0)
	})
	return f
}

// softmaxInline emits out[0:n] = softmax(in[0:n]) for the float32 rows at
// the addresses in locals in and out (which may be equal), unrolled when n
// is at most elemUnroll, else through the looping softmax function.
func (b *builder) softmaxInline(f *wasm.Func, in, out uint32, n int) {
	if n > elemUnroll {
		f.LocalGet(in)
		f.LocalGet(out)
		f.I32Const(int32(n))
		f.I32Const(int32(b.scratch(8 * n)))
		f.Call(b.softmax())
		return
	}
	exp := b.exp()
	mx, sum := f.Local(wasm.F64), f.Local(wasm.F64)
	t := make([]uint32, n)
	for e := range t {
		t[e] = f.Local(wasm.F64)
	}
	load := func(e int) {
		f.LocalGet(in)
		f.Mem(wasm.OpF32Load, 2, uint32(4*e))
		f.Op(wasm.OpF64PromoteF32)
	}
	f.F64Const(math.Inf(-1))
	for e := 0; e < n; e++ {
		load(e)
		f.Op(wasm.OpF64Max)
	}
	f.LocalSet(mx)
	f.F64Const(0)
	for e := 0; e < n; e++ {
		load(e)
		f.LocalGet(mx)
		f.Op(wasm.OpF64Sub)
		f.Call(exp)
		f.LocalTee(t[e])
		f.Op(wasm.OpF64Add)
	}
	f.LocalSet(sum)
	for e := 0; e < n; e++ {
		f.LocalGet(out)
		f.LocalGet(t[e])
		f.LocalGet(sum)
		f.Op(wasm.OpF64Div)
		f.Op(wasm.OpF32DemoteF64)
		f.Mem(wasm.OpF32Store, 2, uint32(4*e))
	}
}
