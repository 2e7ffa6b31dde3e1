package host_test

// A tiny WebAssembly assembler, enough to hand-make modules that break the
// ABI in exactly one way each; Go guests cannot (the SDK gets it right).

const (
	i32 = 0x7f
	i64 = 0x7e
)

type wimport struct {
	module, name    string
	params, results []byte
}

type wfunc struct {
	export          string
	params, results []byte
	body            []byte // instructions, without the final end
}

type wdata struct {
	offset uint32
	bytes  []byte
}

type wmodule struct {
	imports []wimport
	funcs   []wfunc
	pages   uint32 // 0 = no memory
	data    []wdata
}

func uleb(v uint32) []byte {
	var out []byte
	for {
		b := byte(v & 0x7f)
		v >>= 7
		if v != 0 {
			out = append(out, b|0x80)
			continue
		}
		return append(out, b)
	}
}

func sleb(v int32) []byte {
	var out []byte
	for {
		b := byte(v & 0x7f)
		v >>= 7
		if (v == 0 && b&0x40 == 0) || (v == -1 && b&0x40 != 0) {
			return append(out, b)
		}
		out = append(out, b|0x80)
	}
}

func wname(s string) []byte { return append(uleb(uint32(len(s))), s...) }

func vec(items [][]byte) []byte {
	out := uleb(uint32(len(items)))
	for _, it := range items {
		out = append(out, it...)
	}
	return out
}

func section(id byte, body []byte) []byte {
	return append(append([]byte{id}, uleb(uint32(len(body)))...), body...)
}

func functype(params, results []byte) []byte {
	out := append([]byte{0x60}, uleb(uint32(len(params)))...)
	out = append(out, params...)
	out = append(out, uleb(uint32(len(results)))...)
	return append(out, results...)
}

// Instructions.
func constI32(v int32) []byte  { return append([]byte{0x41}, sleb(v)...) }
func localGet(i uint32) []byte { return append([]byte{0x20}, uleb(i)...) }

var (
	loopForever = []byte{0x03, 0x40, 0x0c, 0x00, 0x0b} // loop br 0 end
	memoryCopy  = []byte{0xfc, 0x0a, 0x00, 0x00}
)

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func (m wmodule) encode() []byte {
	out := []byte{0, 'a', 's', 'm', 1, 0, 0, 0}
	var types, imports, funcs, exports, codes [][]byte
	// typeOf returns the index of a signature, adding it once, as
	// compilers do: wazero compiles a trampoline per distinct type.
	typeOf := func(params, results []byte) uint32 {
		ft := functype(params, results)
		for i, t := range types {
			if string(t) == string(ft) {
				return uint32(i)
			}
		}
		types = append(types, ft)
		return uint32(len(types) - 1)
	}
	for _, im := range m.imports {
		imports = append(imports, cat(wname(im.module), wname(im.name), []byte{0x00}, uleb(typeOf(im.params, im.results))))
	}
	for i, f := range m.funcs {
		funcs = append(funcs, uleb(typeOf(f.params, f.results)))
		if f.export != "" {
			exports = append(exports, cat(wname(f.export), []byte{0x00}, uleb(uint32(len(m.imports)+i))))
		}
		body := cat([]byte{0x00}, f.body, []byte{0x0b}) // no locals
		codes = append(codes, cat(uleb(uint32(len(body))), body))
	}
	out = append(out, section(1, vec(types))...)
	if len(imports) > 0 {
		out = append(out, section(2, vec(imports))...)
	}
	out = append(out, section(3, vec(funcs))...)
	if m.pages > 0 {
		out = append(out, section(5, vec([][]byte{cat([]byte{0x00}, uleb(m.pages))}))...)
		exports = append(exports, cat(wname("memory"), []byte{0x02, 0x00}))
	}
	out = append(out, section(7, vec(exports))...)
	out = append(out, section(10, vec(codes))...)
	if len(m.data) > 0 {
		var segs [][]byte
		for _, d := range m.data {
			segs = append(segs, cat([]byte{0x00}, constI32(int32(d.offset)), []byte{0x0b}, uleb(uint32(len(d.bytes))), d.bytes))
		}
		out = append(out, section(11, vec(segs))...)
	}
	return out
}

// abiModule returns a hand-made module that passes every load check for a
// model named "hand" 1.0.0 with input x FP32[-1] and output y FP32[-1]:
// ef_alloc hands out one fixed region and ef_metadata copies JSON from a
// data segment. Tests replace single exports to break one thing.
func abiModule(replace ...wfunc) wmodule {
	meta := []byte(`{"name":"hand","version":"1.0.0"}`)
	const metaAt, allocAt = 16, 1024
	funcs := []wfunc{
		{export: "ef_abi_version", results: []byte{i32}, body: constI32(1)},
		{export: "ef_alloc", params: []byte{i32}, results: []byte{i32}, body: constI32(allocAt)},
		{export: "ef_infer", params: []byte{i32, i32, i32, i32}, results: []byte{i32}, body: constI32(-3)},
		{export: "ef_last_error", params: []byte{i32, i32}, results: []byte{i32}, body: constI32(0)},
		{export: "ef_metadata", params: []byte{i32, i32}, results: []byte{i32},
			body: cat(localGet(0), constI32(metaAt), constI32(int32(len(meta))), memoryCopy, constI32(int32(len(meta))))},
	}
	for _, r := range replace {
		found := false
		for i := range funcs {
			if funcs[i].export == r.export {
				funcs[i], found = r, true
			}
		}
		if !found {
			funcs = append(funcs, r)
		}
	}
	return wmodule{funcs: funcs, pages: 2, data: []wdata{{metaAt, meta}}}
}

// drop removes the export of the named function.
func (m wmodule) drop(export string) wmodule {
	funcs := append([]wfunc(nil), m.funcs...)
	for i := range funcs {
		if funcs[i].export == export {
			funcs[i].export = ""
		}
	}
	m.funcs = funcs
	return m
}
