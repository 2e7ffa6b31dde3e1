// Command grid-anomaly is Edgefleet's first example model: it scores how
// anomalous a grid sensor's readings are. See README.md for the formula.
//
// This file holds the whole model in plain Go, without build tags, so that
// `go test` checks it natively and computes the golden vectors without
// running the WebAssembly module; main_wasip1.go only registers it with
// the guest SDK.
package main

import (
	"fmt"
	"math"

	"github.com/edgefleet/edgefleet/models/tensor"
)

// Name is the model's name in bundles and on the wire.
const Name = "grid-anomaly"

// Inputs and Outputs declare the model's tensors.
var (
	Inputs  = []tensor.Spec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}}
	Outputs = []tensor.Spec{{Name: "score", Datatype: "FP32", Shape: []int64{-1}}}
)

// Calibration holds the constants of one model version.
type Calibration struct {
	NominalVolts, NominalHertz float64 // nominal grid
	RatedAmps, MaxNormalTempC  float64 // only excess current and heat count
	ScaleVolts, ScaleAmps      float64 // deviation that counts as one unit
	ScaleHertz, ScaleTempC     float64
	Steepness, Midpoint        float64 // logistic squash of the distance
}

// calibrations by model version. 1.1.0 is recalibrated after field data:
// frequency deviations count 2.5x more and the midpoint is lower, so the
// same readings score higher (a rollout changes outputs observably).
var calibrations = map[string]Calibration{
	"1.0.0": {
		NominalVolts: 230, NominalHertz: 50, RatedAmps: 16, MaxNormalTempC: 40,
		ScaleVolts: 23, ScaleAmps: 4, ScaleHertz: 0.5, ScaleTempC: 15,
		Steepness: 4, Midpoint: 1,
	},
	"1.1.0": {
		NominalVolts: 230, NominalHertz: 50, RatedAmps: 16, MaxNormalTempC: 40,
		ScaleVolts: 23, ScaleAmps: 4, ScaleHertz: 0.2, ScaleTempC: 15,
		Steepness: 4, Midpoint: 0.8,
	},
}

// CalibrationFor returns the constants of a model version.
func CalibrationFor(version string) (Calibration, error) {
	c, ok := calibrations[version]
	if !ok {
		return Calibration{}, fmt.Errorf("grid-anomaly has no calibration for version %q; known: 1.0.0, 1.1.0", version)
	}
	return c, nil
}

// Score maps one row (volts, amps, hertz, degrees C) to [0, 1]: the
// logistic of the Euclidean distance from nominal, each deviation divided
// by its scale. Current and temperature count only above their limits.
func (c Calibration) Score(volts, amps, hertz, tempC float64) float64 {
	zv := (volts - c.NominalVolts) / c.ScaleVolts
	za := math.Max(0, amps-c.RatedAmps) / c.ScaleAmps
	zf := (hertz - c.NominalHertz) / c.ScaleHertz
	zt := math.Max(0, tempC-c.MaxNormalTempC) / c.ScaleTempC
	d := math.Sqrt(zv*zv + za*za + zf*zf + zt*zt)
	return 1 / (1 + math.Exp(-c.Steepness*(d-c.Midpoint)))
}

// infer is the model: readings [n, 4] FP32 in, score [n] FP32 out.
func infer(c Calibration, in []tensor.Tensor) ([]tensor.Tensor, error) {
	r := in[0] // the SDK has checked name, dtype and shape [-1, 4]
	vals, err := r.Float32s()
	if err != nil {
		return nil, err
	}
	n := len(vals) / 4
	scores := make([]float32, n)
	for i := range scores {
		row := vals[4*i : 4*i+4]
		for _, x := range row {
			if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
				return nil, fmt.Errorf("%w: readings row %d has a non-finite value %v", tensor.ErrInvalid, i, x)
			}
		}
		scores[i] = float32(c.Score(float64(row[0]), float64(row[1]), float64(row[2]), float64(row[3])))
	}
	return []tensor.Tensor{tensor.FromFloat32("score", []int64{int64(n)}, scores)}, nil
}

func main() {}
