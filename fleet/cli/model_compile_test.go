package cli

import (
	"encoding/csv"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler/onnx/onnxtest"
)

const examples = "../../models/examples/"

func readCSV(t *testing.T, s string) [][]string {
	t.Helper()
	recs, err := csv.NewReader(strings.NewReader(s)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// TestModelBuildAndPredict compiles each format's example with the CLI and
// checks `model predict` prints the training library's predictions.
func TestModelBuildAndPredict(t *testing.T) {
	for _, c := range []struct {
		from, dir, file, name string
		labels                []string
		wantLabels            string
	}{
		{"xgboost", "breast-cancer-risk", "model.xgb.json", "breast-cancer-risk", []string{"--labels", "benign,malignant"}, "benign,malignant"},
		{"onnx", "meter-digits", "model.onnx", "meter-digits", nil, "0,1,2,3,4,5,6,7,8,9"},
	} {
		t.Run(c.from, func(t *testing.T) {
			dir := examples + c.dir + "/"
			out := filepath.Join(t.TempDir(), "m.bundle")
			args := append([]string{"model", "build", "--from", c.from, dir + c.file, "--name", c.name, "--version", "2.0.0", "-o", out,
				"--reference", dir + "reference.csv", "--test-inputs", dir + "inputs.csv", "--test-outputs", dir + "expected.csv"}, c.labels...)
			code, stdout, stderr := run(t, args...)
			if code != 0 {
				t.Fatalf("build: exit %d: %s", code, stderr)
			}
			b, err := bundle.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if b.Manifest.Version != "2.0.0" || len(b.Manifest.Tests) != 8 || !strings.Contains(stdout, b.Digest) || !strings.Contains(stdout, "8 golden vectors") {
				t.Fatalf("manifest %+v; stdout %q", b.Manifest, stdout)
			}
			if r := b.Manifest.Reference; r == nil || r.Rows == 0 || len(r.Features) != int(b.Manifest.Inputs[0].Shape[1]) || !strings.Contains(stdout, "drift reference from") {
				t.Fatalf("reference %+v; stdout %q", r, stdout)
			}
			if strings.Join(b.Manifest.Labels, ",") != c.wantLabels {
				t.Fatalf("labels %v, want %s", b.Manifest.Labels, c.wantLabels)
			}
			code, stdout, stderr = run(t, "model", "predict", out, "--csv", dir+"inputs.csv")
			if code != 0 {
				t.Fatalf("predict: exit %d: %s", code, stderr)
			}
			got := readCSV(t, stdout)
			data, err := os.ReadFile(dir + "expected.csv")
			if err != nil {
				t.Fatal(err)
			}
			want := readCSV(t, string(data))
			if len(got) != len(want) || strings.Join(got[0], ",") != strings.Join(want[0], ",") {
				t.Fatalf("predict printed %d rows with header %v; want %d with %v", len(got), got[0], len(want), want[0])
			}
			for r := 1; r < len(want); r++ {
				for k := range want[r] {
					g, _ := strconv.ParseFloat(got[r][k], 64)
					w, _ := strconv.ParseFloat(want[r][k], 64)
					if d := math.Abs(g - w); d > 1e-6 && d > 1e-5*math.Abs(w) {
						t.Fatalf("row %d column %s: predict %v, library %v", r, want[0][k], g, w)
					}
				}
			}
		})
	}
}

func TestModelBuildErrors(t *testing.T) {
	dir := t.TempDir()
	g := &onnxtest.Graph{}
	g.Node("LeakyRelu", "leaky1", []string{"input"}, "y")
	unsupported := filepath.Join(dir, "leaky.onnx")
	if err := os.WriteFile(unsupported, g.Model("input", 4, "y", 4, nil), 0o644); err != nil {
		t.Fatal(err)
	}
	xgb, err := os.ReadFile(examples + "breast-cancer-risk/model.xgb.json")
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.json")
	if err := os.WriteFile(truncated, xgb[:len(xgb)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	narrow := filepath.Join(dir, "narrow.csv")
	if err := os.WriteFile(narrow, []byte("1,2,3\n4,5,6\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out.bundle")
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--from", "onnx", unsupported}, 1, `node "leaky1": operator LeakyRelu is not supported`},
		{[]string{"--from", "xgboost", truncated}, 1, truncated},
		{[]string{"--from", "xgboost", examples + "breast-cancer-risk/model.xgb.json", "--reference", narrow}, 1, "has 3 columns but the model takes 30 features"},
		{[]string{"--from", "xgboost", examples + "breast-cancer-risk/model.xgb.json", "--test-inputs", narrow}, 2, "go together"},
		{[]string{"--from", "tflite", "x"}, 2, `--from "tflite"`},
		{[]string{"--from", "onnx"}, 2, "needs a model FILE"},
	} {
		t.Run(strings.Join(c.args[:2], " "), func(t *testing.T) {
			args := append([]string{"model", "build", "--name", "m", "--version", "1.0.0", "-o", out}, c.args...)
			code, _, stderr := run(t, args...)
			if code != c.code || !strings.Contains(stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, stderr, c.code, c.want)
			}
		})
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("a failed build left a bundle behind")
	}
}

func TestModelPredictErrors(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "m.bundle")
	src := examples + "breast-cancer-risk/"
	if code, _, stderr := run(t, "model", "build", "--from", "xgboost", src+"model.xgb.json", "--name", "m", "--version", "1.0.0", "-o", out); code != 0 {
		t.Fatal(stderr)
	}
	narrow := filepath.Join(dir, "narrow.csv")
	if err := os.WriteFile(narrow, []byte("1,2,3\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A header naming the features may list them in any order, with extra
	// columns; missing values are empty cells.
	data, err := os.ReadFile(src + "inputs.csv")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	var shuffled strings.Builder
	for i, l := range lines[:4] {
		cells := strings.Split(l, ",")
		cells = append(cells[15:], cells[:15]...)
		id := strconv.Itoa(i)
		if i == 0 {
			id = "row_id"
		}
		shuffled.WriteString(id + "," + strings.Join(cells, ",") + "\n")
	}
	reordered := filepath.Join(dir, "reordered.csv")
	if err := os.WriteFile(reordered, []byte(shuffled.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := run(t, "model", "predict", out, "--csv", reordered)
	if code != 0 {
		t.Fatalf("reordered: %s", stderr)
	}
	_, direct, _ := run(t, "model", "predict", out, "--csv", src+"inputs.csv")
	if want := strings.Join(strings.Split(direct, "\n")[:4], "\n"); !strings.HasPrefix(stdout, want) {
		t.Fatalf("reordered columns give\n%s\nwant\n%s", stdout, want)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{out, "--csv", narrow}, 1, "has 3 columns but the model takes 30 features"},
		{[]string{out}, 2, "--csv"},
		{[]string{filepath.Join(dir, "none.bundle"), "--csv", narrow}, 1, "none.bundle"},
	} {
		code, _, stderr := run(t, append([]string{"model", "predict"}, c.args...)...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, c.code, c.want)
		}
	}
}
