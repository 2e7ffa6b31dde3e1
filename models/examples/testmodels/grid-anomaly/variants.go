// Command grid-anomaly (in testmodels) builds the misbehaving test
// variants of the grid-anomaly example. Every variant has grid-anomaly's
// name, inputs and outputs and scores readings exactly as grid-anomaly
// 1.0.0 does, so it can stand in for it in rollouts; the suffix of its
// version picks how it misbehaves (see Behaviours and ../README.md).
//
// This file holds everything in plain Go without build tags, so `go test`
// checks the variants natively and computes their golden vectors;
// main_wasip1.go only registers the variant with the guest SDK.
package main

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/models/sdk"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// Name is grid-anomaly's: the variants replace it in rollouts.
const Name = "grid-anomaly"

// Inputs and Outputs are grid-anomaly's.
var (
	Inputs  = []tensor.Spec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}}
	Outputs = []tensor.Spec{{Name: "score", Datatype: "FP32", Shape: []int64{-1}}}
)

// Behaviour is how a variant misbehaves.
type Behaviour string

// The behaviours, each the suffix of a version (1.2.0-slow, ...).
const (
	// Slow answers correctly, but each call busy-waits until the model
	// function has taken SlowFactor times as long as its scoring did.
	// Measured by the host, where the SDK's fixed cost per call (decoding
	// and encoding frames) is not multiplied, a call of a few rows takes
	// about 3x as long as grid-anomaly 1.0.0's; a large batch up to 5x.
	Slow Behaviour = "slow"
	// Flaky answers correctly, except that it fails (internal error,
	// ef_infer -3) on the requests whose readings hash into the lowest
	// FlakyPercent of 100 buckets: deterministic, so a test can predict
	// which requests fail, and about 30% of varied traffic.
	Flaky Behaviour = "flaky"
	// Loop spins forever on a triggered request.
	Loop Behaviour = "loop"
	// MemBomb allocates without bound on a triggered request, until the
	// Go runtime dies of the memory limit (a trap for the host).
	MemBomb Behaviour = "membomb"
	// Trap reads far outside its linear memory on a triggered request: a
	// genuine WebAssembly trap, not a Go panic.
	Trap Behaviour = "trap"
	// Wrong answers 1 - score on every request, so it fails its golden
	// vectors (which hold the right scores) and must never be activated.
	Wrong Behaviour = "wrong"
)

// Behaviours lists every variant's behaviour.
var Behaviours = []Behaviour{Slow, Flaky, Loop, MemBomb, Trap, Wrong}

const (
	// SlowFactor is how many times longer than its scoring a Slow
	// variant's model function takes.
	SlowFactor = 5
	// FlakyPercent is the share of requests a Flaky variant fails.
	FlakyPercent = 30
	// TriggerTempC triggers Loop, MemBomb and Trap: a request with a row
	// whose temperature reading is at or below it (a sensor fault value no
	// golden vector holds) misbehaves; every other request is answered
	// correctly, so those variants pass their self-test and fail later,
	// as a real bug in a rarely taken branch would.
	TriggerTempC = -1000
)

// BehaviourOf returns the behaviour a version's suffix names.
func BehaviourOf(version string) (Behaviour, error) {
	_, suffix, _ := strings.Cut(version, "-")
	for _, b := range Behaviours {
		if Behaviour(suffix) == b {
			return b, nil
		}
	}
	return "", fmt.Errorf("grid-anomaly test variant %q: the version's suffix must name a behaviour (%v)", version, Behaviours)
}

// Score is grid-anomaly 1.0.0's formula (models/examples/grid-anomaly):
// the logistic of the distance from nominal grid readings. variants_test
// checks it against that example's golden vectors, so the two cannot
// drift apart.
func Score(volts, amps, hertz, tempC float64) float64 {
	zv := (volts - 230) / 23
	za := math.Max(0, amps-16) / 4
	zf := (hertz - 50) / 0.5
	zt := math.Max(0, tempC-40) / 15
	d := math.Sqrt(zv*zv + za*za + zf*zf + zt*zt)
	return 1 / (1 + math.Exp(-4*(d-1)))
}

// Hash is the input hash that decides which requests a Flaky variant
// fails: FNV-1a over the readings' little-endian bytes.
func Hash(readings []byte) uint32 {
	h := fnv.New32a()
	h.Write(readings)
	return h.Sum32()
}

// FlakyFails reports whether a Flaky variant fails a request with these
// readings (the tensor's raw data).
func FlakyFails(readings []byte) bool { return Hash(readings)%100 < FlakyPercent }

// Triggered reports whether readings (n rows of 4) hold a trigger row.
func Triggered(vals []float32) bool {
	for i := 3; i < len(vals); i += 4 {
		if vals[i] <= TriggerTempC {
			return true
		}
	}
	return false
}

// sink keeps the memory bomb's allocations reachable.
var sink [][]byte

// errFlaky is the Flaky variant's failure.
var errFlaky = errors.New("flaky variant: simulated failure for this input")

// variant is one built variant.
type variant struct {
	b Behaviour
	// trap is the Trap behaviour's fault; main_wasip1.go sets it to an
	// out-of-bounds read, tests to a panic.
	trap func()
}

// infer scores readings [n, 4] as grid-anomaly 1.0.0 and misbehaves as
// v.b says.
func (v variant) infer(in []tensor.Tensor) ([]tensor.Tensor, error) {
	start := time.Now()
	vals, err := in[0].Float32s() // the SDK has checked name, dtype and shape
	if err != nil {
		return nil, err
	}
	if v.b == Flaky && FlakyFails(in[0].Data) {
		return nil, fmt.Errorf("%w (hash %08x)", errFlaky, Hash(in[0].Data))
	}
	if Triggered(vals) {
		switch v.b {
		case Loop:
			spin := 0
			for Triggered(vals) { // stays true: loops until the host stops it
				spin++
			}
			_ = spin
		case MemBomb:
			for {
				b := make([]byte, 1<<20)
				for i := 0; i < len(b); i += 4096 {
					b[i] = byte(i>>12) | 1 // touch every page
				}
				sink = append(sink, b)
			}
		case Trap:
			v.trap()
		}
	}
	n := len(vals) / 4
	scores := make([]float32, n)
	for i := range scores {
		row := vals[4*i : 4*i+4]
		for _, x := range row {
			if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
				return nil, fmt.Errorf("%w: readings row %d has a non-finite value %v", sdk.ErrBadInput, i, x)
			}
		}
		s := Score(float64(row[0]), float64(row[1]), float64(row[2]), float64(row[3]))
		if v.b == Wrong {
			s = 1 - s
		}
		scores[i] = float32(s)
	}
	out := []tensor.Tensor{tensor.FromFloat32("score", []int64{int64(n)}, scores)}
	if v.b == Slow {
		took := time.Since(start)
		for time.Since(start) < SlowFactor*took {
		}
	}
	return out, nil
}

func main() {}
