//go:build wasip1

package main

import (
	"unsafe"

	"github.com/edgefleet/edgefleet/models/sdk"
)

// version is set at build time (-ldflags "-X main.version=1.2.0-slow");
// its suffix picks the behaviour.
var version = "1.2.0-slow"

// outOfBounds reads 2 GiB past a live variable: far beyond any linear
// memory this model may have, so the WebAssembly load traps.
func outOfBounds() {
	var x int32
	p := (*int32)(unsafe.Add(unsafe.Pointer(&x), 1<<31))
	sinkInt = *p
}

var sinkInt int32

func init() {
	b, err := BehaviourOf(version)
	if err != nil {
		panic(err)
	}
	v := variant{b: b, trap: outOfBounds}
	sdk.Register(sdk.Model{
		Name:    Name,
		Version: version,
		Inputs:  Inputs,
		Outputs: Outputs,
		Infer:   v.infer,
	})
}
