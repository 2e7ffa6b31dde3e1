package fetch

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func content(n int) ([]byte, string) {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	sum := sha256.Sum256(b)
	return b, hex.EncodeToString(sum[:])
}

// flakyServer serves data; the first request is cut after half the body,
// like a dropped mobile link. It records the Range header of every request.
type flakyServer struct {
	data        []byte
	cutFirst    bool
	ignoreRange bool

	mu     sync.Mutex
	ranges []string
}

func (s *flakyServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	first := len(s.ranges) == 1
	s.mu.Unlock()
	if first && s.cutFirst {
		w.Header().Set("Content-Length", strconv.Itoa(len(s.data)))
		w.WriteHeader(http.StatusOK)
		w.Write(s.data[:len(s.data)/2])
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
		return
	}
	if s.ignoreRange {
		r.Header.Del("Range")
	}
	http.ServeContent(w, r, "b.bundle", time.Unix(0, 0), bytes.NewReader(s.data))
}

func TestFetchResumesCutDownload(t *testing.T) {
	data, digest := content(200_000)
	srv := &flakyServer{data: data, cutFirst: true}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	st := &Store{Dir: t.TempDir()}

	_, err := st.Fetch(t.Context(), ts.URL+"/b", digest, int64(len(data)))
	if err == nil {
		t.Fatal("first fetch succeeded though the server cut the connection")
	}
	fi, err := os.Stat(filepath.Join(st.Dir, digest+".part"))
	if err != nil || fi.Size() == 0 || fi.Size() >= int64(len(data)) {
		t.Fatalf("partial file after cut: %v, %v", fi, err)
	}
	had := fi.Size()

	path, err := st.Fetch(t.Context(), ts.URL+"/b", digest, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if want := "bytes=" + strconv.FormatInt(had, 10) + "-"; srv.ranges[1] != want {
		t.Fatalf("second request Range = %q, want %q", srv.ranges[1], want)
	}
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got, data) {
		t.Fatal("resumed file differs from the served one")
	}
	if path != st.Path(digest) || !st.Has(digest) {
		t.Fatalf("stored at %s", path)
	}
	if _, err := os.Stat(filepath.Join(st.Dir, digest+".part")); !os.IsNotExist(err) {
		t.Fatal(".part file left after success")
	}
	// Stored bundles are not fetched again.
	if _, err := st.Fetch(t.Context(), ts.URL+"/b", digest, int64(len(data))); err != nil || len(srv.ranges) != 2 {
		t.Fatalf("refetch: %v, %d requests", err, len(srv.ranges))
	}
}

func TestFetchServerIgnoresRange(t *testing.T) {
	data, digest := content(50_000)
	srv := &flakyServer{data: data, cutFirst: true, ignoreRange: true}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	st := &Store{Dir: t.TempDir()}
	if _, err := st.Fetch(t.Context(), ts.URL, digest, int64(len(data))); err == nil {
		t.Fatal("cut download succeeded")
	}
	path, err := st.Fetch(t.Context(), ts.URL, digest, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Fatal("a 200 answer to a range request was appended, not restarted")
	}
}

func TestFetchRefuses(t *testing.T) {
	data, digest := content(10_000)
	_, otherDigest := content(9_999)
	ts := httptest.NewServer(&flakyServer{data: data})
	defer ts.Close()
	notFound := httptest.NewServer(http.NotFoundHandler())
	defer notFound.Close()

	cases := []struct {
		name   string
		url    string
		digest string
		size   int64
		is     error
		want   string
	}{
		{"digest mismatch", ts.URL, otherDigest, int64(len(data)), ErrDigestMismatch, "does not match"},
		{"size mismatch", ts.URL, digest, int64(len(data)) + 5, ErrDigestMismatch, "does not match"},
		{"too large", ts.URL, digest, 100, ErrTooLarge, "more than 100 bytes"},
		{"not found", notFound.URL, digest, int64(len(data)), nil, "404"},
		{"bad digest", ts.URL, "../../etc/passwd", 10, nil, "not 64 lowercase hex"},
		{"negative size", ts.URL, digest, -1, nil, "outside"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st := &Store{Dir: t.TempDir()}
			_, err := st.Fetch(t.Context(), c.url, c.digest, c.size)
			if err == nil || !strings.Contains(err.Error(), c.want) || (c.is != nil && !errors.Is(err, c.is)) {
				t.Fatalf("err = %v, want %q", err, c.want)
			}
			if st.Has(c.digest) {
				t.Fatal("refused bundle was stored")
			}
			if c.is == ErrDigestMismatch {
				if _, err := os.Stat(filepath.Join(st.Dir, c.digest+".part")); !os.IsNotExist(err) {
					t.Fatal("mismatching .part file kept")
				}
			}
		})
	}
}

func TestFetchUnknownSize(t *testing.T) {
	data, digest := content(1234)
	ts := httptest.NewServer(&flakyServer{data: data})
	defer ts.Close()
	st := &Store{Dir: t.TempDir()}
	if _, err := st.Fetch(t.Context(), ts.URL, digest, 0); err != nil {
		t.Fatal(err)
	}
}

func TestPrune(t *testing.T) {
	st := &Store{Dir: t.TempDir()}
	_, a := content(1)
	_, b := content(2)
	for _, n := range []string{a + ".bundle", b + ".bundle", b + ".part", "notes.txt"} {
		os.WriteFile(filepath.Join(st.Dir, n), []byte("x"), 0o644)
	}
	gone, err := st.Prune(map[string]bool{a: true})
	if err != nil || len(gone) != 2 {
		t.Fatalf("pruned %v, %v", gone, err)
	}
	if !st.Has(a) || st.Has(b) {
		t.Fatal("prune kept the wrong bundle")
	}
	if _, err := os.Stat(filepath.Join(st.Dir, "notes.txt")); err != nil {
		t.Fatal("prune removed a file it does not own")
	}
}

func FuzzContentRangeStart(f *testing.F) {
	f.Add("bytes 100-199/200")
	f.Add("bytes */200")
	f.Add("")
	f.Fuzz(func(t *testing.T, h string) {
		n, err := contentRangeStart(h)
		if err == nil && !strings.HasPrefix(h, "bytes ") {
			t.Fatalf("accepted %q as starting at %d", h, n)
		}
	})
}
