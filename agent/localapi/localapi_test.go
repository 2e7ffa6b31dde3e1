package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// oneModel serves a single real loaded model under its name.
type oneModel struct{ m *host.Model }

func (o oneModel) Infer(ctx context.Context, name, version string, in []tensor.Tensor) (deploy.Result, error) {
	man, ok := o.Manifest(name)
	if !ok {
		return deploy.Result{}, fmt.Errorf("%w: %q", deploy.ErrNoModel, name)
	}
	res := deploy.Result{Model: man.Name, Version: man.Version}
	if version != "" && version != man.Version {
		return res, fmt.Errorf("%w: %q version %s (version %s is)", deploy.ErrNoModel, name, version, man.Version)
	}
	out, err := o.m.Infer(ctx, in)
	res.Outputs = out
	return res, err
}

func (o oneModel) Manifest(name string) (*bundle.Manifest, bool) {
	if o.m == nil || o.m.Manifest().Name != name {
		return nil, false
	}
	return o.m.Manifest(), true
}

func (o oneModel) Ready() bool { return o.m != nil }

func loadModel(t testing.TB) *host.Model {
	t.Helper()
	h := modeltest.NewHost(t, host.Options{PoolSize: 2})
	m, err := h.Load(t.Context(), modeltest.ExampleBundle(t, "grid-anomaly", "1.0.0"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func do(t *testing.T, h http.Handler, method, path, body string) (int, map[string]any) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	var out map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil && !strings.HasPrefix(path, "/metrics") {
		t.Fatalf("%s %s: body %q is not JSON: %v", method, path, rec.Body.String(), err)
	}
	return rec.Code, out
}

func TestNoModel(t *testing.T) {
	h := New(Options{Models: oneModel{}}).Handler()
	cases := []struct {
		method, path string
		code         int
	}{
		{"GET", "/v2/health/live", 200},
		{"GET", "/v2/health/ready", 503},
		{"GET", "/v2/models/grid-anomaly", 404},
		{"GET", "/v2/models/grid-anomaly/ready", 404},
		{"POST", "/v2/models/grid-anomaly/infer", 404},
		{"GET", "/v2/nothing", 404},
	}
	body := `{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}`
	for _, c := range cases {
		code, out := do(t, h, c.method, c.path, body)
		if code != c.code {
			t.Errorf("%s %s = %d %v, want %d", c.method, c.path, code, out, c.code)
		}
		if code == 404 && out["error"] == nil {
			t.Errorf("%s %s: 404 without an error message: %v", c.method, c.path, out)
		}
	}
}

func TestInferAndMetadata(t *testing.T) {
	s := New(Options{Models: oneModel{loadModel(t)}, MaxBody: 64 << 10})
	h := s.Handler()

	if code, _ := do(t, h, "GET", "/v2/health/ready", ""); code != 200 {
		t.Fatalf("ready = %d with a model", code)
	}
	code, md := do(t, h, "GET", "/v2/models/grid-anomaly", "")
	if code != 200 || md["platform"] != Platform || md["name"] != "grid-anomaly" {
		t.Fatalf("metadata %d %v", code, md)
	}
	if v := md["versions"].([]any); len(v) != 1 || v[0] != "1.0.0" {
		t.Fatalf("versions %v", v)
	}
	in := md["inputs"].([]any)[0].(map[string]any)
	if in["name"] != "readings" || in["datatype"] != "FP32" {
		t.Fatalf("inputs %v", md["inputs"])
	}

	good := `{"id":"r1","inputs":[{"name":"readings","shape":[2,4],"datatype":"FP32","data":[[230,10,50,35],[250,90,47,95]]}]}`
	cases := []struct {
		name, path, body string
		code             int
		want             string
	}{
		{"ok", "/v2/models/grid-anomaly/infer", good, 200, `"model_version":"1.0.0"`},
		{"exact version", "/v2/models/grid-anomaly/versions/1.0.0/infer", good, 200, `"id":"r1"`},
		{"other version", "/v2/models/grid-anomaly/versions/2.0.0/infer", good, 404, "version 1.0.0 is"},
		{"wrong shape", "/v2/models/grid-anomaly/infer", `{"inputs":[{"name":"readings","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}`, 400, "shape"},
		{"wrong name", "/v2/models/grid-anomaly/infer", `{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}`, 400, "error"},
		{"data short", "/v2/models/grid-anomaly/infer", `{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[1,2]}]}`, 400, "error"},
		{"not json", "/v2/models/grid-anomaly/infer", `{"inputs":`, 400, "not an inference request"},
		{"no inputs", "/v2/models/grid-anomaly/infer", `{}`, 400, "no inputs"},
		{"too large", "/v2/models/grid-anomaly/infer", `{"inputs":[` + strings.Repeat(" ", 70<<10) + `]}`, 413, "over 65536 bytes"},
		{"unknown model", "/v2/models/nope/infer", good, 404, `not active`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req := httptest.NewRequest("POST", c.path, strings.NewReader(c.body))
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.want) {
				t.Fatalf("%d %s, want %d containing %q", rec.Code, rec.Body.String(), c.code, c.want)
			}
			if c.code != 200 {
				var e map[string]string
				if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e["error"] == "" {
					t.Fatalf("error body %q", rec.Body.String())
				}
			}
		})
	}

	// The scores: the second row is far off nominal.
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/v2/models/grid-anomaly/infer", strings.NewReader(good)))
	var resp struct {
		ModelName string `json:"model_name"`
		Outputs   []struct {
			Name  string    `json:"name"`
			Shape []int64   `json:"shape"`
			Data  []float64 `json:"data"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
		t.Fatal(err)
	}
	if resp.ModelName != "grid-anomaly" || len(resp.Outputs) != 1 || resp.Outputs[0].Name != "score" || len(resp.Outputs[0].Data) != 2 {
		t.Fatalf("response %s", rec.Body.String())
	}
	if sc := resp.Outputs[0].Data; !(sc[0] < 0.5 && sc[1] > 0.5) {
		t.Fatalf("scores %v: want nominal then anomalous", sc)
	}

	req := httptest.NewRequest("GET", "/metrics", nil)
	mrec := httptest.NewRecorder()
	h.ServeHTTP(mrec, req)
	body, _ := io.ReadAll(mrec.Body)
	for _, want := range []string{
		`edgefleet_agent_inferences_total{model="grid-anomaly",version="1.0.0",outcome="ok"} 3`,
		`edgefleet_agent_inferences_total{model="grid-anomaly",version="1.0.0",outcome="error"} 2`,
		`edgefleet_agent_requests_rejected_total{reason="too_large"} 1`,
		`edgefleet_agent_requests_rejected_total{reason="bad_request"} 3`,
		`edgefleet_agent_ready 1`,
	} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("metrics lack %s:\n%s", want, body)
		}
	}
}

func TestOutputsFilter(t *testing.T) {
	h := New(Options{Models: oneModel{loadModel(t)}}).Handler()
	body := `{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"outputs":[{"name":"other"}]}`
	code, out := do(t, h, "POST", "/v2/models/grid-anomaly/infer", body)
	if code != 200 || out["outputs"] != nil {
		t.Fatalf("%d %v: want no outputs when none requested exist", code, out)
	}
}

func FuzzDecodeInferRequest(f *testing.F) {
	f.Add([]byte(`{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}`))
	f.Add([]byte(`{"inputs":[{"name":"b","shape":[2],"datatype":"BOOL","data":[true,false]}],"outputs":[{"name":"x"}]}`))
	f.Add([]byte(`{"inputs":[{"name":"n","shape":[1,2],"datatype":"INT64","data":[[1,2]]}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		req, in, err := DecodeInferRequest(bytes.NewReader(body), 1<<16)
		if err != nil {
			return
		}
		if len(in) != len(req.Inputs) || len(in) == 0 {
			t.Fatalf("%d tensors for %d inputs", len(in), len(req.Inputs))
		}
		for _, x := range in {
			if err := x.Validate(); err != nil {
				t.Fatalf("decoded an invalid tensor: %v", err)
			}
		}
	})
}
