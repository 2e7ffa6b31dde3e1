package wasm

import (
	"bytes"
	"context"
	"math"
	"testing"

	"github.com/tetratelabs/wazero"
)

func TestLEB128(t *testing.T) {
	for _, c := range []struct {
		v    int64
		want []byte
	}{
		{0, []byte{0}}, {63, []byte{63}}, {64, []byte{0xC0, 0}}, {-1, []byte{0x7F}}, {-64, []byte{0x40}},
		{-65, []byte{0xBF, 0x7F}}, {624485, []byte{0xE5, 0x8E, 0x26}}, {-123456, []byte{0xC0, 0xBB, 0x78}},
	} {
		if got := S64(nil, c.v); !bytes.Equal(got, c.want) {
			t.Errorf("S64(%d) = %x, want %x", c.v, got, c.want)
		}
	}
	for _, c := range []struct {
		v    uint32
		want []byte
	}{{0, []byte{0}}, {127, []byte{127}}, {128, []byte{0x80, 1}}, {624485, []byte{0xE5, 0x8E, 0x26}}, {1<<32 - 1, []byte{0xFF, 0xFF, 0xFF, 0xFF, 0x0F}}} {
		if got := U32(nil, c.v); !bytes.Equal(got, c.want) {
			t.Errorf("U32(%d) = %x, want %x", c.v, got, c.want)
		}
	}
}

// TestModuleRuns writes a module with a global, data, a loop, a call and
// float arithmetic, and runs it in wazero.
func TestModuleRuns(t *testing.T) {
	m := &Module{}
	m.SetMemory(1)
	g := m.AddGlobal(I32, true, 0)
	m.SetGlobalInit(g, 5)
	m.AddData(100, []byte{1, 2, 3, 4})
	m.ExportMemory("memory")

	// sq(x f64) -> f64
	sq := m.NewFunc([]ValType{F64}, []ValType{F64})
	sq.LocalGet(0)
	sq.LocalGet(0)
	sq.Op(OpF64Mul)

	// run() -> f64: sum of sq(i) for i < global g, plus the bytes at 100.
	run := m.NewFunc(nil, []ValType{F64})
	i := run.Local(I32)
	acc := run.Local(F64)
	run.Loop(BlockEmpty)
	run.LocalGet(acc)
	run.LocalGet(i)
	run.Op(OpF64ConvertI32S)
	run.Call(sq)
	run.Op(OpF64Add)
	run.LocalSet(acc)
	run.LocalGet(i)
	run.I32Const(1)
	run.Op(OpI32Add)
	run.LocalTee(i)
	run.GlobalGet(g)
	run.Op(OpI32LtS)
	run.BrIf(0)
	run.End()
	run.LocalGet(acc)
	run.I32Const(0)
	run.Mem(OpI32Load, 2, 100)
	run.Op(OpF64ConvertI32S)
	run.Op(OpF64Add)
	m.ExportFunc("run", run)

	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	mod, err := rt.Instantiate(ctx, m.Encode())
	if err != nil {
		t.Fatal(err)
	}
	res, err := mod.ExportedFunction("run").Call(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// 0+1+4+9+16 = 30, plus 0x04030201.
	if got, want := res[0], float64(30+0x04030201); float64frombits(got) != want {
		t.Fatalf("run() = %v, want %v", float64frombits(got), want)
	}
}

func float64frombits(b uint64) float64 { return math.Float64frombits(b) }
