package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/models/examples/testmodels"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
)

func writeBundle(t *testing.T, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "m.bundle")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestModelCheck(t *testing.T) {
	cache := modeltest.CompilationCacheDir()
	good := writeBundle(t, modeltest.BuildExample(t, "grid-anomaly", "1.0.0"))
	wrong := writeBundle(t, modeltest.BuildTestModel(t, "grid-anomaly", testmodels.Wrong))

	code, stdout, stderr := run(t, "model", "check", good, "--cache-dir", cache)
	if code != 0 || !strings.Contains(stdout, "passed: the bundle conforms to model ABI v1") || strings.Contains(stdout, "FAIL") {
		t.Fatalf("good bundle: exit %d\n%s%s", code, stdout, stderr)
	}

	// Every failing golden vector is listed, the exit code is 1 and
	// stderr names the file.
	code, stdout, stderr = run(t, "model", "check", "--cache-dir", cache, wrong)
	if code != 1 || strings.Count(stdout, "FAIL") != 4 || !strings.Contains(stdout, "golden 4/4") ||
		!strings.Contains(stderr, wrong) || !strings.Contains(stderr, "4 problems") {
		t.Fatalf("wrong bundle: exit %d\n%s%s", code, stdout, stderr)
	}

	// The device's caps are the ones checked against.
	code, stdout, _ = run(t, "model", "check", good, "--cache-dir", cache, "--max-memory-pages", "256", "-o", "json")
	var r host.Report
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("-o json: %v\n%s", err, stdout)
	}
	if code != 0 || !r.OK() || r.Count(host.Warn) != 1 || r.Problems()[0].Check != "limits" || !strings.Contains(stdout, `"severity": "warn"`) {
		t.Fatalf("cap below the manifest's limit: exit %d, report %+v", code, r)
	}

	// A file that is not a bundle is reported, not crashed on.
	junk := writeBundle(t, []byte("not a bundle"))
	code, stdout, _ = run(t, "model", "check", junk)
	if code != 1 || !strings.Contains(stdout, "FAIL  bundle") {
		t.Fatalf("junk: exit %d\n%s", code, stdout)
	}
}

func TestModelCheckUsage(t *testing.T) {
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"model", "check"}, 2, "want one BUNDLE"},
		{[]string{"model", "check", "a", "b"}, 2, "want one BUNDLE"},
		{[]string{"model", "check", "x.bundle", "-o", "xml"}, 2, `-o "xml"`},
		{[]string{"model", "check", "x.bundle", "--max-memory-pages", "0"}, 2, "want 1 to 65536"},
		{[]string{"model", "check", "/nonexistent.bundle"}, 1, "/nonexistent.bundle"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			code, _, stderr := run(t, c.args...)
			if code != c.code || !strings.Contains(stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, stderr, c.code, c.want)
			}
		})
	}
}
