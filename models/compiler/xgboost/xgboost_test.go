package xgboost

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tiny is a hand-written model: one tree, root splits feature 1 at 0.5,
// missing goes left; leaves -1 (left) and 2 (right). base_score 0.5.
const tiny = `{"learner":{"feature_names":["a","b"],"feature_types":["float","float"],
"learner_model_param":{"base_score":"5E-1","num_class":"0","num_feature":"2","num_target":"1"},
"objective":{"name":"reg:squarederror"},
"gradient_booster":{"name":"gbtree","model":{"tree_info":[0],"trees":[{
"left_children":[1,-1,-1],"right_children":[2,-1,-1],"split_indices":[1,0,0],
"split_conditions":[0.5,-1,2],"default_left":[1,0,0],"split_type":[0,0,0],
"tree_param":{"num_nodes":"3","num_feature":"2","size_leaf_vector":"0"}}]}}},"version":[1,7,4]}`

func TestParseTiny(t *testing.T) {
	m, err := Parse([]byte(tiny))
	if err != nil {
		t.Fatal(err)
	}
	if m.Objective != RegSquaredError || m.Groups != 1 || m.BaseMargin != 0.5 || m.Version != "1.7.4" {
		t.Fatalf("model %+v", m)
	}
	if m.Trees[0].Depth() != 1 {
		t.Fatalf("depth %d", m.Trees[0].Depth())
	}
	nan := float32(math.NaN())
	for _, c := range []struct {
		x    []float32
		want float32
	}{
		{[]float32{0, 0.4}, -0.5},
		{[]float32{0, 0.5}, 2.5}, // x < t goes left, so equal goes right
		{[]float32{0, nan}, -0.5},
		{[]float32{nan, 7}, 2.5},
	} {
		out := make([]float32, 1)
		m.Predict(c.x, out)
		if out[0] != c.want {
			t.Errorf("Predict(%v) = %v, want %v", c.x, out[0], c.want)
		}
	}
}

func TestBaseMarginLogistic(t *testing.T) {
	m, err := Parse([]byte(strings.Replace(strings.Replace(tiny, "reg:squarederror", "binary:logistic", 1), `"5E-1"`, `"[2E-1]"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	if want := float32(-math.Log(4)); math.Abs(float64(m.BaseMargin-want)) > 1e-6 || m.Transform != Sigmoid {
		t.Fatalf("base margin %v, want %v", m.BaseMargin, want)
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, from, to string
		is             error
		want           string
	}{
		{"dart", `"name":"gbtree"`, `"name":"dart"`, ErrUnsupported, `booster "dart"`},
		{"objective", "reg:squarederror", "rank:pairwise", ErrUnsupported, `objective "rank:pairwise"`},
		{"categorical", `"split_type":[0,0,0]`, `"split_type":[1,0,0]`, ErrUnsupported, "categorical split"},
		{"feature out of range", `"split_indices":[1,0,0]`, `"split_indices":[5,0,0]`, ErrInvalid, "feature 5, outside the model's 2 features"},
		{"child out of range", `"left_children":[1,-1,-1]`, `"left_children":[9,-1,-1]`, ErrInvalid, "children 9 and 2"},
		{"self loop", `"left_children":[1,-1,-1],"right_children":[2,-1,-1]`, `"left_children":[1,1,-1],"right_children":[2,2,-1]`, ErrInvalid, "reached twice"},
		{"arrays differ", `"default_left":[1,0,0]`, `"default_left":[1,0]`, ErrInvalid, "differ in length"},
		{"num_nodes", `"num_nodes":"3"`, `"num_nodes":"4"`, ErrInvalid, "num_nodes 4"},
		{"tree_info", `"tree_info":[0]`, `"tree_info":[1]`, ErrInvalid, "output group 1"},
		{"feature names", `"feature_names":["a","b"]`, `"feature_names":["a"]`, ErrInvalid, "1 feature_names"},
		{"feature type", `"feature_types":["float","float"]`, `"feature_types":["float","c"]`, ErrUnsupported, `type "c"`},
		{"infinite leaf", `"split_conditions":[0.5,-1,2]`, `"split_conditions":[0.5,-1,1e39]`, ErrInvalid, "not a finite float32"},
		{"multi target", `"num_target":"1"`, `"num_target":"2"`, ErrUnsupported, "multi-target"},
		{"bad base_score", `"5E-1"`, `"x"`, ErrInvalid, "base_score"},
		{"softprob classes", `"reg:squarederror"`, `"multi:softprob"`, ErrInvalid, "num_class 0"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := strings.Replace(tiny, c.from, c.to, 1)
			if src == tiny {
				t.Fatalf("%q not found in the model", c.from)
			}
			_, err := Parse([]byte(src))
			if !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v; want %v naming %q", err, c.is, c.want)
			}
		})
	}
	for _, bad := range []string{"", "{", "[]", "null", "\x00\x01binary", `{"learner":{}}`, tiny[:len(tiny)/2]} {
		if _, err := Parse([]byte(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("Parse(%.20q): %v, want ErrInvalid", bad, err)
		}
	}
}

func TestReadFileNamesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "broken.json")
	if err := os.WriteFile(path, []byte(tiny[:100]), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("error %v does not name %s", err, path)
	}
}

// FuzzParse: no input makes Parse panic, and a model Parse accepts
// evaluates any row, missing values included, without panicking.
func FuzzParse(f *testing.F) {
	f.Add([]byte(tiny))
	for _, p := range []string{"../testdata/fixtures/xgb-wine/model.xgb.json", "../../examples/breast-cancer-risk/model.xgb.json"} {
		if data, err := os.ReadFile(p); err == nil {
			f.Add(data)
			f.Add(data[:len(data)/3])
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Parse(data)
		if err != nil {
			return
		}
		row := make([]float32, len(m.Features))
		for i := range row {
			if i%3 == 0 {
				row[i] = float32(math.NaN())
			}
		}
		out := make([]float32, m.Groups)
		m.Predict(row, out)
	})
}
