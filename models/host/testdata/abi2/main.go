//go:build wasip1

// Command abi2 is a test guest for models/host that claims Model ABI v2,
// which the host must refuse. It does not use the SDK (the SDK speaks v1).
package main

//lint:file-ignore U1000 the functions are exported to the host by //go:wasmexport, which staticcheck does not see

//go:wasmexport ef_abi_version
func abiVersion() int32 { return 2 }

//go:wasmexport ef_alloc
func alloc(size int32) int32 { return 0 }

//go:wasmexport ef_infer
func infer(inPtr, inLen, outPtr, outCap int32) int32 { return -3 }

//go:wasmexport ef_last_error
func lastError(outPtr, outCap int32) int32 { return 0 }

//go:wasmexport ef_metadata
func metadata(outPtr, outCap int32) int32 { return -3 }

var version = "1.0.0"

func main() { _ = version }
