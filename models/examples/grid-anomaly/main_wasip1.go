//go:build wasip1

package main

import (
	"github.com/edgefleet/edgefleet/models/sdk"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// version is set at build time: -ldflags "-X main.version=1.1.0". It
// picks the calibration (score.go).
var version = "1.0.0"

func init() {
	c, err := CalibrationFor(version)
	if err != nil {
		panic(err)
	}
	sdk.Register(sdk.Model{
		Name:    Name,
		Version: version,
		Inputs:  Inputs,
		Outputs: Outputs,
		Infer:   func(in []tensor.Tensor) ([]tensor.Tensor, error) { return infer(c, in) },
	})
}
