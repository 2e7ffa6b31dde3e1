// Command misbehave is a test guest for models/host: it doubles its input,
// and misbehaves on purpose when the first element is a negative code.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/edgefleet/edgefleet/models/sdk"
	"github.com/edgefleet/edgefleet/models/tensor"
)

var version = "1.0.0"

// Behaviours, selected by the first input element.
const (
	failInternal = -1  // return an error
	failBadInput = -2  // return an error marked as bad input
	doPanic      = -3  // panic (the SDK recovers it)
	doExit       = -4  // os.Exit(3): a trap for the host
	doSpin       = -5  // loop forever: the deadline must stop it
	doOOM        = -6  // allocate past the memory limit
	doBigOutput  = -7  // answer with 100000 elements (over the host's first output buffer)
	doPrint      = -8  // write to stderr, then answer normally
	doWrongOut   = -9  // answer with an output the manifest does not declare
	doSnoop      = -10 // answer with how many host capabilities it could reach (files, env, args)
)

var sink [][]byte

func infer(in []tensor.Tensor) ([]tensor.Tensor, error) {
	x, err := in[0].Float32s()
	if err != nil {
		return nil, err
	}
	if len(x) > 0 {
		switch x[0] {
		case failInternal:
			return nil, errors.New("asked to fail")
		case failBadInput:
			return nil, fmt.Errorf("%w: asked to refuse", sdk.ErrBadInput)
		case doPanic:
			panic("asked to panic")
		case doExit:
			os.Exit(3)
		case doSpin:
			n := 0
			for x[0] < 0 {
				n++
			}
			_ = n
		case doOOM:
			for {
				sink = append(sink, make([]byte, 1<<20))
			}
		case doBigOutput:
			x = make([]float32, 100000)
		case doPrint:
			fmt.Fprintln(os.Stderr, "hello from the guest")
		case doSnoop:
			found := float32(len(os.Environ()) + len(os.Args))
			for _, p := range []string{"/", ".", "/etc/hostname", "/proc/self/environ"} {
				if _, err := os.ReadFile(p); err == nil {
					found++
				}
				if _, err := os.ReadDir(p); err == nil {
					found++
				}
			}
			if err := os.WriteFile("/tmp/edgefleet-guest-was-here", []byte("x"), 0o644); err == nil {
				found++
			}
			return []tensor.Tensor{tensor.FromFloat32("y", []int64{1}, []float32{found})}, nil
		case doWrongOut:
			return []tensor.Tensor{tensor.FromFloat32("z", []int64{1}, []float32{1})}, nil
		}
	}
	y := make([]float32, len(x))
	for i, v := range x {
		y[i] = 2 * v
	}
	return []tensor.Tensor{tensor.FromFloat32("y", []int64{int64(len(y))}, y)}, nil
}

func init() {
	sdk.Register(sdk.Model{
		Name:    "misbehave",
		Version: version,
		Inputs:  []tensor.Spec{{Name: "x", Datatype: "FP32", Shape: []int64{-1}}},
		Outputs: []tensor.Spec{{Name: "y", Datatype: "FP32", Shape: []int64{-1}}},
		Infer:   infer,
	})
}

func main() {}
