package api

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// readFromRecorder is a ResponseWriter with its own ReadFrom, as the
// server's connection writer has (sendfile).
type readFromRecorder struct {
	*httptest.ResponseRecorder
	readFroms int
}

func (r *readFromRecorder) ReadFrom(src io.Reader) (int64, error) {
	r.readFroms++
	return io.Copy(r.ResponseRecorder, src)
}

// TestStatusWriterReadFrom: a body copied into the logging writer reaches
// the writer beneath through its ReadFrom (sendfile for a file), and a
// writer without one still gets the whole body.
func TestStatusWriterReadFrom(t *testing.T) {
	body := strings.Repeat("artifact ", 10_000)
	// http.ServeContent copies a file through io.CopyN, a LimitReader.
	src := func() io.Reader { return io.LimitReader(strings.NewReader(body), int64(len(body))) }
	rf := &readFromRecorder{ResponseRecorder: httptest.NewRecorder()}
	if n, err := io.Copy(&statusWriter{ResponseWriter: rf, status: http.StatusOK}, src()); err != nil || n != int64(len(body)) {
		t.Fatalf("copy: %d, %v", n, err)
	}
	if rf.readFroms != 1 || rf.Body.String() != body {
		t.Fatalf("ReadFrom called %d times, body of %d bytes; want once, %d", rf.readFroms, rf.Body.Len(), len(body))
	}
	plain := httptest.NewRecorder()
	if _, err := io.Copy(&statusWriter{ResponseWriter: plain, status: http.StatusOK}, src()); err != nil || plain.Body.String() != body {
		t.Fatalf("without ReadFrom beneath: %d bytes, %v", plain.Body.Len(), err)
	}
}
