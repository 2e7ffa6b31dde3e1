package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"math"
	"os"
	"reflect"
	"sort"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/tensor"
)

var update = flag.Bool("update", false, "rewrite golden-<version>.json from grid-anomaly 1.0.0's golden vectors")

// versions maps each behaviour to the version that builds it.
var versions = map[Behaviour]string{
	Slow:    "1.2.0-slow",
	Flaky:   "1.3.0-flaky",
	Loop:    "1.4.0-loop",
	MemBomb: "1.5.0-membomb",
	Trap:    "1.6.0-trap",
	Wrong:   "1.7.0-wrong",
}

// exampleDir is the real grid-anomaly, whose 1.0.0 the variants copy.
const exampleDir = "../../grid-anomaly"

func exampleGolden(t *testing.T) build.Golden {
	t.Helper()
	g, err := build.ReadGolden(exampleDir, "1.0.0")
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func float32Bytes(v []float64) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(float32(x)))
	}
	return b
}

// expected is the golden file of a variant: grid-anomaly 1.0.0's vectors
// (the right answers, so Wrong fails them), less those a Flaky variant
// would fail, since it must pass its self-test.
func expected(t *testing.T, b Behaviour) build.Golden {
	t.Helper()
	var g build.Golden
	for _, tv := range exampleGolden(t).Tests {
		if b == Flaky && FlakyFails(float32Bytes(tv.Inputs[0].Data)) {
			continue
		}
		g.Tests = append(g.Tests, tv)
	}
	if len(g.Tests) == 0 {
		t.Fatalf("%s keeps none of grid-anomaly 1.0.0's golden vectors", b)
	}
	return g
}

func TestGoldenFiles(t *testing.T) {
	for _, b := range Behaviours {
		version := versions[b]
		t.Run(version, func(t *testing.T) {
			if got, err := BehaviourOf(version); err != nil || got != b {
				t.Fatalf("BehaviourOf(%s) = %v, %v", version, got, err)
			}
			want := expected(t, b)
			path := "golden-" + version + ".json"
			if *update {
				data, err := json.MarshalIndent(want, "", "  ")
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := build.ReadGolden(".", version)
			if err != nil {
				t.Fatalf("%v (run go test -update here to write it)", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("%s disagrees with grid-anomaly 1.0.0's golden vectors; run go test -update here", path)
			}
		})
	}
	if _, err := BehaviourOf("1.0.0"); err == nil {
		t.Fatal("a version without a behaviour suffix was accepted")
	}
}

// TestScoreIsGridAnomaly100 pins Score to the real example's answers.
func TestScoreIsGridAnomaly100(t *testing.T) {
	for i, tv := range exampleGolden(t).Tests {
		in, want := tv.Inputs[0].Data, tv.Outputs[0].Data
		for r := range want {
			f := in[4*r : 4*r+4]
			if got := float32(Score(f[0], f[1], f[2], f[3])); math.Abs(float64(got)-want[r]) > 1e-6 {
				t.Fatalf("vector %d row %d: Score %v, grid-anomaly 1.0.0 says %v", i, r, got, want[r])
			}
		}
	}
}

// TestModelJSON keeps model.json equal to the real example's tensors.
func TestModelJSON(t *testing.T) {
	mine, err := build.ReadModelInfo(".")
	if err != nil {
		t.Fatal(err)
	}
	real, err := build.ReadModelInfo(exampleDir)
	if err != nil {
		t.Fatal(err)
	}
	if mine.Name != Name || real.Name != Name || !reflect.DeepEqual(mine.Inputs, real.Inputs) ||
		!reflect.DeepEqual(mine.Outputs, real.Outputs) || mine.Limits != real.Limits {
		t.Fatalf("model.json %+v differs from grid-anomaly's %+v", mine, real)
	}
	conv := func(ss []bundle.TensorSpec) []tensor.Spec {
		var out []tensor.Spec
		for _, s := range ss {
			out = append(out, tensor.Spec{Name: s.Name, Datatype: s.Datatype, Shape: s.Shape})
		}
		return out
	}
	if !reflect.DeepEqual(conv(mine.Inputs), Inputs) || !reflect.DeepEqual(conv(mine.Outputs), Outputs) {
		t.Fatalf("model.json tensors differ from the Go declarations")
	}
}

func readings(rows ...[4]float32) []tensor.Tensor {
	var v []float32
	for _, r := range rows {
		v = append(v, r[:]...)
	}
	return []tensor.Tensor{tensor.FromFloat32("readings", []int64{int64(len(rows)), 4}, v)}
}

func score(t *testing.T, out []tensor.Tensor) []float32 {
	t.Helper()
	s, err := out[0].Float32s()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestBehaviours runs each variant natively, except the two that never
// return (their tests are models/host's, in WebAssembly).
func TestBehaviours(t *testing.T) {
	nominal := [4]float32{230, 10, 50, 35}
	trigger := [4]float32{230, 10, 50, TriggerTempC}
	right := float32(Score(230, 10, 50, 35))
	trapped := errors.New("trapped")
	for _, b := range []Behaviour{Slow, Flaky, Trap, Wrong} {
		t.Run(string(b), func(t *testing.T) {
			v := variant{b: b, trap: func() { panic(trapped) }}
			out, err := v.infer(readings(nominal))
			if b == Flaky && FlakyFails(readings(nominal)[0].Data) {
				if !errors.Is(err, errFlaky) {
					t.Fatalf("flaky on a failing input: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := right
			if b == Wrong {
				want = 1 - right
			}
			if s := score(t, out); len(s) != 1 || s[0] != want {
				t.Fatalf("scored %v, want %v", s, want)
			}
			if b == Trap {
				func() {
					defer func() {
						if p := recover(); p != trapped {
							t.Fatalf("trigger row: recovered %v, want the trap", p)
						}
					}()
					_, _ = v.infer(readings(trigger))
				}()
			}
		})
	}
}

// TestFlakyRate: about FlakyPercent of varied requests fail, and always
// the same ones.
func TestFlakyRate(t *testing.T) {
	v := variant{b: Flaky}
	failed := 0
	const n = 2000
	for i := 0; i < n; i++ {
		in := readings([4]float32{200 + float32(i)/10, 10, 50, 35})
		_, err1 := v.infer(in)
		_, err2 := v.infer(in)
		if (err1 == nil) != (err2 == nil) {
			t.Fatalf("request %d failed once and passed once", i)
		}
		if err1 != nil {
			failed++
		}
	}
	if rate := float64(failed) / n; math.Abs(rate-FlakyPercent/100.0) > 0.04 {
		t.Fatalf("failed %.1f%% of requests, want about %d%%", 100*rate, FlakyPercent)
	}
}

func TestSlowTakesLonger(t *testing.T) {
	rows := make([][4]float32, 2000)
	for i := range rows {
		rows[i] = [4]float32{230, 10, 50 + float32(i%7)/10, 35}
	}
	in := readings(rows...)
	// Interleaved, and compared by median, so that a machine busy with
	// other work slows both alike.
	var fast, slow []time.Duration
	for i := 0; i < 9; i++ {
		for _, b := range []Behaviour{Wrong, Slow} { // Wrong: the same work, no waiting
			start := time.Now()
			if _, err := (variant{b: b}).infer(in); err != nil {
				t.Fatal(err)
			}
			if b == Slow {
				slow = append(slow, time.Since(start))
			} else {
				fast = append(fast, time.Since(start))
			}
		}
	}
	median := func(d []time.Duration) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	if f, s := median(fast), median(slow); s < 2*f {
		t.Fatalf("slow took %v, the same work without waiting %v; want about %dx", s, f, SlowFactor)
	}
}
