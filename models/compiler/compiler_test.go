package compiler_test

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// specDirs lists every fixture and every compiled example.
func specDirs(t *testing.T) []string {
	t.Helper()
	var dirs []string
	for _, d := range []string{"testdata/fixtures", "../examples"} {
		found, err := compiler.FindSpecs(d)
		if err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, found...)
	}
	if len(dirs) < 10 {
		t.Fatalf("found %d fixtures, want at least 10: %v", len(dirs), dirs)
	}
	return dirs
}

// close reports whether got matches want within 1e-5 relative, or 1e-6
// absolute for values near zero (the acceptance bar).
func closeEnough(got, want float64) bool {
	if math.IsNaN(want) {
		return math.IsNaN(got)
	}
	d := math.Abs(got - want)
	return d <= 1e-6 || d <= 1e-5*math.Abs(want)
}

// infer runs rows through a loaded model and returns one row of output
// columns per input row.
func infer(t *testing.T, m *host.Model, inputName string, rows [][]float32) [][]float32 {
	t.Helper()
	width := len(rows[0])
	flat := make([]float32, 0, len(rows)*width)
	for _, r := range rows {
		flat = append(flat, r...)
	}
	in := tensor.FromFloat32(inputName, []int64{int64(len(rows)), int64(width)}, flat)
	outs, err := m.Infer(context.Background(), []tensor.Tensor{in})
	if err != nil {
		t.Fatal(err)
	}
	res := make([][]float32, len(rows))
	for _, o := range outs {
		vals, err := o.Float32s()
		if err != nil {
			t.Fatal(err)
		}
		per := len(vals) / len(rows)
		for r := range rows {
			res[r] = append(res[r], vals[r*per:(r+1)*per]...)
		}
	}
	return res
}

func TestFixturesMatchLibraries(t *testing.T) {
	h := modeltest.NewHost(t, host.Options{})
	for _, dir := range specDirs(t) {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			spec, err := compiler.ReadSpec(dir)
			if err != nil {
				t.Fatal(err)
			}
			res, err := spec.Build()
			if err != nil {
				t.Fatal(err)
			}
			if res.Tests == 0 {
				t.Fatal("no golden vectors")
			}
			// Load runs the golden vectors through the module.
			m, err := h.Load(context.Background(), res.Bundle)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close(context.Background())
			model, err := spec.Load()
			if err != nil {
				t.Fatal(err)
			}
			inputs, err := compiler.ReadTableFile(spec.Path(spec.TestInputs))
			if err != nil {
				t.Fatal(err)
			}
			rows, err := inputs.Select(model.Features)
			if err != nil {
				t.Fatal(err)
			}
			got := infer(t, m, res.Metadata.Inputs[0].Name, rows)
			missing := 0
			for _, r := range rows {
				for _, v := range r {
					if v != v {
						missing++
						break
					}
				}
			}
			if model.Format == compiler.XGBoost && missing == 0 {
				t.Error("the fixture has no rows with missing values")
			}
			checks := append([]compiler.Check{{Outputs: spec.TestOutputs, Library: spec.Library}}, spec.Checks...)
			for _, c := range checks {
				tab, err := compiler.ReadTableFile(spec.Path(c.Outputs))
				if err != nil {
					t.Fatal(err)
				}
				want, err := tab.Select(model.Columns())
				if err != nil {
					t.Fatal(err)
				}
				if len(want) != len(rows) {
					t.Fatalf("%s: %d rows for %d inputs", c.Outputs, len(want), len(rows))
				}
				worst := 0.0
				for r := range want {
					for k := range want[r] {
						g, w := float64(got[r][k]), float64(want[r][k])
						if !closeEnough(g, w) {
							t.Errorf("%s (%s) row %d %s: module %v, library %v", c.Outputs, c.Library, r+1, model.Columns()[k], g, w)
						}
						if d := math.Abs(g - w); w != 0 {
							worst = math.Max(worst, d/math.Abs(w))
						}
					}
				}
				t.Logf("%s: %d rows (%d with missing values) match %s; worst relative difference %.2g", c.Outputs, len(rows), missing, c.Library, worst)
			}
			t.Logf("module %d bytes, weights %d bytes, %d golden vectors", res.ModuleBytes, res.WeightBytes, res.Tests)
		})
	}
}

func TestMetadataAndManifest(t *testing.T) {
	spec, err := compiler.ReadSpec("../examples/breast-cancer-risk")
	if err != nil {
		t.Fatal(err)
	}
	res, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	man := res.Bundle.Manifest
	if man.Name != "breast-cancer-risk" || man.Version != "1.0.0" || man.ABI != 1 {
		t.Fatalf("manifest %s %s abi %d", man.Name, man.Version, man.ABI)
	}
	if len(man.Inputs) != 1 || man.Inputs[0].Shape[1] != 30 || man.Outputs[0].Name != "probability" {
		t.Fatalf("schema %+v -> %+v", man.Inputs, man.Outputs)
	}
	md := res.Metadata
	if len(md.Features) != 30 || md.Features[0] != "mean_radius" || strings.Join(md.Labels, ",") != "benign,malignant" {
		t.Fatalf("features %v labels %v", md.Features, md.Labels)
	}
	if strings.Join(man.Labels, ",") != "benign,malignant" {
		t.Fatalf("manifest labels %v", man.Labels)
	}
	ref := man.Reference
	if ref == nil || ref.Rows != 200 || len(ref.Features) != 30 || len(ref.Outputs) != 1 {
		t.Fatalf("reference %+v", ref)
	}
	// Missing values are in no bucket: some of feature 0's are missing.
	if total := ref.Features[0].Total(); total >= 200 || total < 150 {
		t.Fatalf("feature 0 histogram counts %d of 200 rows, want most but not all (some are missing)", total)
	}
	if ref.Features[0].Name != "mean_radius" || len(ref.Features[0].Edges) != compiler.ReferenceBins-1 {
		t.Fatalf("feature 0 histogram %+v, want mean_radius on 9 decile edges", ref.Features[0])
	}
	if o := ref.Outputs[0]; o.Name != "probability" || !reflect.DeepEqual(o.Edges, compiler.ProbabilityEdges) || o.Total() != 200 {
		t.Fatalf("probability histogram %+v", o)
	}
	// The reference survives encoding and decoding.
	enc, err := res.Bundle.Encode()
	if err != nil {
		t.Fatal(err)
	}
	dec, err := bundle.Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(dec.Manifest.Reference, ref) {
		t.Fatal("reference differs after decoding the bundle")
	}
	// The module reports the same metadata.
	h := modeltest.NewHost(t, host.Options{})
	m, err := h.Load(context.Background(), res.Bundle)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(context.Background())
	if !strings.Contains(string(m.Metadata()), `"labels":["benign","malignant"]`) {
		t.Fatalf("module metadata lacks labels: %.300s", m.Metadata())
	}
}

func TestFeatureCountMismatch(t *testing.T) {
	spec, err := compiler.ReadSpec("testdata/fixtures/xgb-wine")
	if err != nil {
		t.Fatal(err)
	}
	res, err := spec.Build()
	if err != nil {
		t.Fatal(err)
	}
	h := modeltest.NewHost(t, host.Options{})
	m, err := h.Load(context.Background(), res.Bundle)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close(context.Background())
	in := tensor.FromFloat32("input", []int64{1, 12}, make([]float32, 12))
	_, err = m.Infer(context.Background(), []tensor.Tensor{in})
	if !errors.Is(err, host.ErrBadInput) || !strings.Contains(err.Error(), "13") {
		t.Fatalf("12 features for a 13-feature model: %v", err)
	}
	// A table of the wrong width is refused at build time, naming it.
	model, _ := spec.Load()
	bad := &compiler.Table{Source: "bad.csv", Rows: [][]float32{make([]float32, 12)}}
	_, err = compiler.Compile(model, compiler.Options{Name: "x", Version: "1.0.0", Reference: bad})
	if err == nil || !strings.Contains(err.Error(), "bad.csv has 12 columns but the model takes 13 features") {
		t.Fatalf("reference of 12 columns: %v", err)
	}
}

func TestCompileErrors(t *testing.T) {
	spec, err := compiler.ReadSpec("testdata/fixtures/xgb-diabetes")
	if err != nil {
		t.Fatal(err)
	}
	model, err := spec.Load()
	if err != nil {
		t.Fatal(err)
	}
	o, err := spec.Options()
	if err != nil {
		t.Fatal(err)
	}
	// Test outputs that are not the model's predictions.
	wrong := *o.TestOutputs
	wrong.Rows = append([][]float32(nil), wrong.Rows...)
	wrong.Rows[0] = []float32{wrong.Rows[0][0] + 1}
	bad := o
	bad.TestOutputs = &wrong
	if _, err := compiler.Compile(model, bad); !errors.Is(err, compiler.ErrMismatch) {
		t.Fatalf("wrong test outputs: %v", err)
	}
	// Labels that do not fit the outputs.
	bad = o
	bad.Labels = []string{"a", "b", "c"}
	if _, err := compiler.Compile(model, bad); err == nil || !strings.Contains(err.Error(), "3 class labels") {
		t.Fatalf("3 labels for a regression: %v", err)
	}
	// A bad bundle name is the bundle package's error.
	bad = o
	bad.Name = "Bad Name"
	if _, err := compiler.Compile(model, bad); !errors.Is(err, bundle.ErrInvalid) {
		t.Fatalf("bad name: %v", err)
	}
}

func TestTable(t *testing.T) {
	tab, err := compiler.ReadTable(strings.NewReader("b,a\n1,2\n,4\nNA,5e-1\n"), "t.csv")
	if err != nil {
		t.Fatal(err)
	}
	rows, err := tab.Select([]string{"a", "b"})
	if err != nil {
		t.Fatal(err)
	}
	if rows[0][0] != 2 || rows[0][1] != 1 || rows[1][1] == rows[1][1] || rows[2][0] != 0.5 {
		t.Fatalf("rows %v", rows)
	}
	if _, err := tab.Select([]string{"a", "c"}); err == nil || !strings.Contains(err.Error(), `no column "c"`) {
		t.Fatalf("missing column: %v", err)
	}
	noHeader, err := compiler.ReadTable(strings.NewReader("1,2,3\n4,,6\n"), "n.csv")
	if err != nil || noHeader.Columns != nil || len(noHeader.Rows) != 2 {
		t.Fatalf("no header: %v %+v", err, noHeader)
	}
	for _, bad := range []string{"a,b\n1,2,3\n", "1,x\n2,y\n", "a\n1e99\n"} {
		if _, err := compiler.ReadTable(strings.NewReader(bad), "bad.csv"); !errors.Is(err, compiler.ErrTable) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestMain(m *testing.M) {
	os.Exit(m.Run())
}

// FuzzReadTable: no CSV makes ReadTable or Select panic, and every row
// ReadTable returns has the table's width.
func FuzzReadTable(f *testing.F) {
	f.Add("a,b\n1,2\n,4\n", "a")
	f.Add("1,2,3\n4,,6\n", "f1")
	f.Add("\"x\ny\",z\n1,NaN\n", "z")
	f.Fuzz(func(t *testing.T, data, pick string) {
		tab, err := compiler.ReadTable(strings.NewReader(data), "fuzz.csv")
		if err != nil {
			return
		}
		for _, r := range tab.Rows {
			if len(r) != tab.Width() {
				t.Fatalf("row of %d cells in a table of width %d", len(r), tab.Width())
			}
		}
		rows, err := tab.Select([]string{pick, "f1"})
		if err == nil && len(rows) != len(tab.Rows) {
			t.Fatalf("Select returned %d rows of %d", len(rows), len(tab.Rows))
		}
	})
}
