package localapi

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// BenchmarkLocalInfer is one inference as an application on the device
// makes it: a JSON request over loopback HTTP/1.1 to the local endpoint,
// decoded, run on a real loaded model (the grid-anomaly Go guest), its
// answer encoded and read back. It is the path the agent's build flags
// (-l on cold packages, no HTTP/2; see agentbuild) could slow, so its
// figure goes beside the binary size in RATIONALE.md.
func BenchmarkLocalInfer(b *testing.B) {
	srv := httptest.NewServer(New(Options{Models: oneModel{loadModel(b)}, MaxBody: 64 << 10}).Handler())
	defer srv.Close()
	body := []byte(`{"id":"r1","inputs":[{"name":"readings","shape":[2,4],"datatype":"FP32","data":[[230,10,50,35],[250,90,47,95]]}]}`)
	client := srv.Client()
	url := srv.URL + "/v2/models/grid-anomaly/infer"
	b.ReportAllocs()
	for b.Loop() {
		resp, err := client.Post(url, "application/json", bytes.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		out, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !strings.Contains(string(out), `"model_version":"1.0.0"`) {
			b.Fatalf("status %d, body %q, err %v", resp.StatusCode, out, err)
		}
	}
}
