package compiler

import (
	"github.com/edgefleet/edgefleet/models/compiler/wasm"
	"github.com/edgefleet/edgefleet/models/compiler/xgboost"
)

// Trees compile to code, not data: each split is an `if` on the feature it
// tests, each leaf an f32.const, and the last selectDepth levels of every
// tree are branch-free selects. A row then costs one load and compare per
// split it meets, with no loads of node tables, and the module is about
// 15 bytes per split and 5 per leaf, less than a node table would take.
//
// The trees of one output group are cut into chunks of about chunkSplits
// splits, one function per chunk: the runtime's compiler (register
// allocation above all) grows faster than linearly with a function's size,
// and activation time is mostly compile time.
const chunkSplits = 64

// compileTrees emits the row function of an ensemble: margins accumulated
// in float32 from the base margin, tree by tree in file order (as XGBoost
// does), then the objective's transform.
func (b *builder) compileTrees(m *xgboost.Model) *wasm.Func {
	// Chunks per group, trees in file order.
	type chunk struct{ trees []*xgboost.Tree }
	groups := make([][]chunk, m.Groups)
	size := make([]int, m.Groups)
	for i := range m.Trees {
		t := &m.Trees[i]
		g := t.Group
		s, _ := t.Splits()
		if n := len(groups[g]); n == 0 || size[g]+s > chunkSplits && len(groups[g][n-1].trees) > 0 {
			groups[g] = append(groups[g], chunk{})
			size[g] = 0
		}
		n := len(groups[g])
		groups[g][n-1].trees = append(groups[g][n-1].trees, t)
		size[g] += s
	}

	chunkFns := make([][]*wasm.Func, m.Groups)
	for g, cs := range groups {
		for _, c := range cs {
			chunkFns[g] = append(chunkFns[g], b.treeChunk(c.trees))
		}
	}

	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.I32}, none)
	const inRow, outRow = 0, 1
	for g := 0; g < m.Groups; g++ {
		f.LocalGet(outRow)
		f.F32Const(m.BaseMargin)
		for _, c := range chunkFns[g] {
			// acc = chunk(inRow, acc)
			acc := f.Local(wasm.F32)
			f.LocalSet(acc)
			f.LocalGet(inRow)
			f.LocalGet(acc)
			f.Call(c)
		}
		if m.Transform == xgboost.Sigmoid {
			b.sigmoid(f)
		}
		f.Mem(wasm.OpF32Store, 2, uint32(4*g))
	}
	if m.Transform == xgboost.Softmax {
		b.softmaxInline(f, outRow, outRow, m.Groups)
	}
	return f
}

// treeChunk emits chunk(inRow i32, acc f32) -> f32: acc plus every tree's
// leaf value, in order.
func (b *builder) treeChunk(trees []*xgboost.Tree) *wasm.Func {
	f := b.mod.NewFunc([]wasm.ValType{wasm.I32, wasm.F32}, []wasm.ValType{wasm.F32})
	const inRow, acc = 0, 1
	for _, t := range trees {
		f.LocalGet(acc)
		flat := 0
		if t.Depth() <= shallowDepth {
			flat = shallowDepth
		}
		emitNode(f, t, 0, flat)
		f.Op(wasm.OpF32Add)
		f.LocalSet(acc)
	}
	f.LocalGet(acc)
	return f
}

// emitNode emits the expression of the subtree at node i: an f32.
//
// x < t goes left; a missing value (NaN) fails every comparison, so the
// test is written so that NaN lands on the node's default side: "x < t"
// when missing goes right, "x >= t" (then right, else left) when missing
// goes left.
func emitNode(f *wasm.Func, t *xgboost.Tree, i int32, flat int) {
	n := t.Nodes[i]
	if n.IsLeaf() {
		f.F32Const(n.Value)
		return
	}
	first, second := n.Left, n.Right
	if n.DefaultLeft {
		first, second = n.Right, n.Left
	}
	if h := t.DepthAt(i); h <= selectDepth || h <= flat {
		// Small subtrees are branch-free: both sides, then select.
		emitNode(f, t, first, flat)
		emitNode(f, t, second, flat)
		emitTest(f, n)
		f.Op(wasm.OpSelect)
		return
	}
	emitTest(f, n)
	f.If(byte(wasm.F32))
	emitNode(f, t, first, flat)
	f.Else()
	emitNode(f, t, second, flat)
	f.End()
}

// emitTest emits the i32 that is 1 when node n takes its "first" side:
// left when missing values go right, right when they go left.
func emitTest(f *wasm.Func, n xgboost.Node) {
	f.LocalGet(0) // the row
	f.Mem(wasm.OpF32Load, 2, uint32(4*n.Feature))
	f.F32Const(n.Value)
	if n.DefaultLeft {
		f.Op(wasm.OpF32Ge)
	} else {
		f.Op(wasm.OpF32Lt)
	}
}

// selectDepth is the height of the subtrees evaluated branch-free: both
// sides, then a select. Their branches would be mispredicted half the time
// on real data, and every block costs the runtime's compiler time at
// activation. Trees no deeper than shallowDepth are branch-free whole.
// Measured on wazero 1.12 with random rows (BENCHMARKS.md): on a 100-tree
// depth-6 ensemble, height 2 runs fastest (heights 1, 3 and 4 take 1.2x,
// 1.1x and 1.8x its time); a 40-tree depth-3 ensemble compiles in 1.4 ms
// branch-free against 2.0 ms with branches at its root.
const (
	selectDepth  = 2
	shallowDepth = 3
)
