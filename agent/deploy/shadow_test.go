package deploy

import (
	"math"
	"testing"

	"github.com/edgefleet/edgefleet/models/tensor"
)

func TestCompare(t *testing.T) {
	f32 := func(name string, shape []int64, v ...float32) tensor.Tensor {
		return tensor.FromFloat32(name, shape, v)
	}
	i64 := func(name string, v ...float64) tensor.Tensor {
		x, err := tensor.FromFloat64(name, tensor.INT64, []int64{int64(len(v))}, v)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	cases := []struct {
		name    string
		a, b    []tensor.Tensor
		agree   bool
		maxDiff float64
	}{
		{"same scores", []tensor.Tensor{f32("score", []int64{2}, 0.1, 0.9)}, []tensor.Tensor{f32("score", []int64{2}, 0.1, 0.9)}, true, 0},
		{"scores move, same side of 0.5", []tensor.Tensor{f32("score", []int64{2}, 0.64, 0.1)}, []tensor.Tensor{f32("score", []int64{2}, 0.85, 0.2)}, true, 0.21},
		{"a score flips", []tensor.Tensor{f32("score", []int64{2}, 0.17, 0.1)}, []tensor.Tensor{f32("score", []int64{2}, 0.94, 0.1)}, false, 0.77},
		{"class scores, same argmax", []tensor.Tensor{f32("probs", []int64{1, 3}, 0.2, 0.5, 0.3)}, []tensor.Tensor{f32("probs", []int64{1, 3}, 0.1, 0.6, 0.3)}, true, 0.1},
		{"class scores, argmax flips", []tensor.Tensor{f32("probs", []int64{2, 2}, 0.6, 0.4, 0.1, 0.9)}, []tensor.Tensor{f32("probs", []int64{2, 2}, 0.6, 0.4, 0.8, 0.2)}, false, 0.7},
		{"regression within tolerance", []tensor.Tensor{f32("demand", []int64{1}, 100)}, []tensor.Tensor{f32("demand", []int64{1}, 104)}, true, 4},
		{"regression beyond tolerance", []tensor.Tensor{f32("demand", []int64{1}, 100)}, []tensor.Tensor{f32("demand", []int64{1}, 106)}, false, 6},
		{"integer labels equal", []tensor.Tensor{i64("label", 1, 2)}, []tensor.Tensor{i64("label", 1, 2)}, true, 0},
		{"integer labels differ", []tensor.Tensor{i64("label", 1, 2)}, []tensor.Tensor{i64("label", 1, 3)}, false, 1},
		{"missing output", []tensor.Tensor{f32("score", []int64{1}, 0.1)}, []tensor.Tensor{f32("other", []int64{1}, 0.1)}, false, 0},
		{"other shape", []tensor.Tensor{f32("score", []int64{1}, 0.1)}, []tensor.Tensor{f32("score", []int64{2}, 0.1, 0.1)}, false, 0},
		{"extra output", []tensor.Tensor{f32("score", []int64{1}, 0.1)}, []tensor.Tensor{f32("score", []int64{1}, 0.1), f32("x", []int64{1}, 1)}, false, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := Compare(c.a, c.b, 0.05)
			if got.Agree != c.agree || math.Abs(got.MaxDiff-c.maxDiff) > 1e-6 {
				t.Fatalf("Compare = %+v, want agree %v, max diff %v", got, c.agree, c.maxDiff)
			}
		})
	}
}
