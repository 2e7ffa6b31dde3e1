// Package onnxtest writes small ONNX model files for tests: graphs of any
// operators (supported or not), float initializers, metadata, encoded with
// the protobuf wire writer. It writes only what tests need, and writes it
// the way the onnx Python package does.
package onnxtest

import (
	"encoding/binary"
	"math"

	"google.golang.org/protobuf/encoding/protowire"
)

// Graph is an ONNX graph being written.
type Graph struct {
	nodes, inits [][]byte
	// Opset is the default domain's opset version; 0 means 13.
	Opset int64
}

// Attr is a node attribute: an int (I) or a float (F).
type Attr struct {
	Name    string
	I       int64
	F       float32
	IsFloat bool
}

// Init adds a float32 initializer of the given dims, stored as raw_data.
func (g *Graph) Init(name string, dims []int64, data []float32) {
	var t []byte
	for _, d := range dims {
		t = protowire.AppendTag(t, 1, protowire.VarintType)
		t = protowire.AppendVarint(t, uint64(d))
	}
	t = protowire.AppendTag(t, 2, protowire.VarintType)
	t = protowire.AppendVarint(t, 1) // FLOAT
	t = appendString(t, 8, name)
	raw := make([]byte, 4*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	t = protowire.AppendTag(t, 9, protowire.BytesType)
	t = protowire.AppendBytes(t, raw)
	g.inits = append(g.inits, t)
}

// Node adds a node of operator op.
func (g *Graph) Node(op, name string, inputs []string, output string, attrs ...Attr) {
	var n []byte
	for _, in := range inputs {
		n = appendString(n, 1, in)
	}
	n = appendString(n, 2, output)
	n = appendString(n, 3, name)
	n = appendString(n, 4, op)
	for _, a := range attrs {
		var b []byte
		b = appendString(b, 1, a.Name)
		if a.IsFloat {
			b = protowire.AppendTag(b, 2, protowire.Fixed32Type)
			b = protowire.AppendFixed32(b, math.Float32bits(a.F))
			b = protowire.AppendTag(b, 20, protowire.VarintType)
			b = protowire.AppendVarint(b, 1)
		} else {
			b = protowire.AppendTag(b, 3, protowire.VarintType)
			b = protowire.AppendVarint(b, uint64(a.I))
			b = protowire.AppendTag(b, 20, protowire.VarintType)
			b = protowire.AppendVarint(b, 2)
		}
		n = protowire.AppendTag(n, 5, protowire.BytesType)
		n = protowire.AppendBytes(n, b)
	}
	g.nodes = append(g.nodes, n)
}

// Model returns the model file: one float input [batch, inWidth], one
// float output [batch, outWidth], metadata props in order of pairs
// (key, value, key, value, ...).
func (g *Graph) Model(input string, inWidth int, output string, outWidth int, props []string) []byte {
	var gr []byte
	for _, n := range g.nodes {
		gr = protowire.AppendTag(gr, 1, protowire.BytesType)
		gr = protowire.AppendBytes(gr, n)
	}
	gr = appendString(gr, 2, "test")
	for _, t := range g.inits {
		gr = protowire.AppendTag(gr, 5, protowire.BytesType)
		gr = protowire.AppendBytes(gr, t)
	}
	gr = protowire.AppendTag(gr, 11, protowire.BytesType)
	gr = protowire.AppendBytes(gr, valueInfo(input, inWidth))
	gr = protowire.AppendTag(gr, 12, protowire.BytesType)
	gr = protowire.AppendBytes(gr, valueInfo(output, outWidth))

	var m []byte
	m = protowire.AppendTag(m, 1, protowire.VarintType)
	m = protowire.AppendVarint(m, 8)
	m = appendString(m, 2, "onnxtest")
	m = protowire.AppendTag(m, 7, protowire.BytesType)
	m = protowire.AppendBytes(m, gr)
	opset := g.Opset
	if opset == 0 {
		opset = 13
	}
	var op []byte
	op = appendString(op, 1, "")
	op = protowire.AppendTag(op, 2, protowire.VarintType)
	op = protowire.AppendVarint(op, uint64(opset))
	m = protowire.AppendTag(m, 8, protowire.BytesType)
	m = protowire.AppendBytes(m, op)
	for i := 0; i+1 < len(props); i += 2 {
		var kv []byte
		kv = appendString(kv, 1, props[i])
		kv = appendString(kv, 2, props[i+1])
		m = protowire.AppendTag(m, 14, protowire.BytesType)
		m = protowire.AppendBytes(m, kv)
	}
	return m
}

// valueInfo is a float tensor value of shape ["batch", width].
func valueInfo(name string, width int) []byte {
	var batch, w []byte
	batch = appendString(batch, 2, "batch")
	w = protowire.AppendTag(w, 1, protowire.VarintType)
	w = protowire.AppendVarint(w, uint64(width))
	var shape []byte
	for _, d := range [][]byte{batch, w} {
		shape = protowire.AppendTag(shape, 1, protowire.BytesType)
		shape = protowire.AppendBytes(shape, d)
	}
	var tt []byte
	tt = protowire.AppendTag(tt, 1, protowire.VarintType)
	tt = protowire.AppendVarint(tt, 1)
	tt = protowire.AppendTag(tt, 2, protowire.BytesType)
	tt = protowire.AppendBytes(tt, shape)
	var typ []byte
	typ = protowire.AppendTag(typ, 1, protowire.BytesType)
	typ = protowire.AppendBytes(typ, tt)
	var v []byte
	v = appendString(v, 1, name)
	v = protowire.AppendTag(v, 2, protowire.BytesType)
	v = protowire.AppendBytes(v, typ)
	return v
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}
