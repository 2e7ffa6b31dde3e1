//go:build wasip1

package sdk

//lint:file-ignore U1000 the functions are exported to the host by //go:wasmexport, which staticcheck does not see

import (
	"errors"
	"unsafe"
)

// The exports are thin: they translate (pointer, length) pairs into slices
// of memory the SDK handed out through ef_alloc, and call the runtime.

//go:wasmexport ef_abi_version
func efABIVersion() int32 { return ABIVersion }

//go:wasmexport ef_alloc
func efAlloc(size int32) int32 {
	if size < 0 {
		return 0
	}
	b := rt().alloc(int(size))
	return int32(uintptr(unsafe.Pointer(&b[0])))
}

//go:wasmexport ef_infer
func efInfer(inPtr, inLen, outPtr, outCap int32) int32 {
	r := rt()
	in, ok := r.region(inPtr, inLen)
	if !ok {
		return r.fail(CodeBadInput, errors.New("input range is not inside a buffer from ef_alloc"))
	}
	out, ok := r.region(outPtr, outCap)
	if !ok {
		return r.fail(CodeBadInput, errors.New("output range is not inside a buffer from ef_alloc"))
	}
	return r.infer(in, out)
}

//go:wasmexport ef_last_error
func efLastError(outPtr, outCap int32) int32 {
	r := rt()
	out, ok := r.region(outPtr, outCap)
	if !ok {
		return 0
	}
	return r.lastError(out)
}

//go:wasmexport ef_metadata
func efMetadata(outPtr, outCap int32) int32 {
	r := rt()
	out, ok := r.region(outPtr, outCap)
	if !ok {
		return r.fail(CodeBadInput, errors.New("metadata range is not inside a buffer from ef_alloc"))
	}
	return r.metadata(out)
}

// rt returns the registered model, or a stand-in that fails every call
// when the module forgot to call Register.
func rt() *runtime {
	if registered == nil {
		registered = &runtime{}
	}
	return registered
}

// region maps a guest pointer range onto the ef_alloc buffer that holds it.
func (r *runtime) region(ptr, n int32) ([]byte, bool) {
	return r.find(uint32(ptr), uint32(n), func(b []byte) uint32 {
		return uint32(uintptr(unsafe.Pointer(&b[0])))
	})
}
