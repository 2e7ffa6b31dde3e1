package fetch

import (
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
)

// TestFetchOverHTTPS downloads from a TLS server that also offers HTTP/2,
// as a controller behind TLS does. The agent is built without net/http's
// HTTP/2 (-tags nethttpomithttp2, scripts/internal/agentbuild): its client
// then offers only HTTP/1.1 and the download must work all the same. Run
// with the tag to check the shipped build:
// go test -tags nethttpomithttp2 ./agent/fetch/
func TestFetchOverHTTPS(t *testing.T) {
	data, digest := content(300 << 10)
	srv := httptest.NewUnstartedServer(&flakyServer{data: data})
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	var proto string
	client := srv.Client()
	client.Transport.(*http.Transport).ForceAttemptHTTP2 = true
	base := client.Transport
	client.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := base.RoundTrip(r)
		if err == nil {
			proto = resp.Proto
		}
		return resp, err
	})
	s := &Store{Dir: filepath.Join(t.TempDir(), "store"), Client: client}
	path, err := s.Fetch(t.Context(), srv.URL+"/b.bundle", digest, int64(len(data)))
	if err != nil {
		t.Fatalf("https download: %v", err)
	}
	if err := verify(path, digest, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	t.Logf("downloaded over %s", proto)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
