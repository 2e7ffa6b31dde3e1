// Package fetch downloads model bundles into the agent's bundle store,
// content-addressed by their SHA-256.
//
// A download goes to DIR/<digest>.part and resumes with an HTTP Range
// request when it was cut (flaky networks are the normal case on the edge).
// Only a file whose size and SHA-256 match what the desired state pinned is
// renamed to DIR/<digest>.bundle, so a .bundle file is always complete and
// verified when it was stored.
package fetch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/edgefleet/edgefleet/agent/internal/durable"
	"github.com/edgefleet/edgefleet/models/bundle"
)

// ErrDigestMismatch is returned when the downloaded bytes are not the ones
// the desired state pinned. The partial file is deleted.
var ErrDigestMismatch = errors.New("downloaded bundle does not match its digest")

// ErrTooLarge is returned when the server sends more bytes than expected.
var ErrTooLarge = errors.New("download larger than expected")

var digestRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ValidDigest reports whether d is a lowercase hex SHA-256, the only form
// accepted as a file name in the store.
func ValidDigest(d string) bool { return digestRE.MatchString(d) }

// Store is a directory of verified bundle files.
type Store struct {
	// Dir holds <digest>.bundle and <digest>.part files.
	Dir string
	// Client does the HTTP requests; nil means a client without a
	// timeout (the caller's context bounds each download).
	Client *http.Client
	Logger *slog.Logger
	// MaxSize caps a download; 0 means bundle.MaxBundleSize. (Agent
	// releases, stored with the same code, are bigger than bundles.)
	MaxSize int64
}

func (s *Store) maxSize() int64 {
	if s.MaxSize > 0 {
		return s.MaxSize
	}
	return bundle.MaxBundleSize
}

// Path returns where the verified bundle with this digest is stored.
func (s *Store) Path(digest string) string { return filepath.Join(s.Dir, digest+".bundle") }

func (s *Store) partPath(digest string) string { return filepath.Join(s.Dir, digest+".part") }

// Has reports whether the verified bundle with this digest is stored.
func (s *Store) Has(digest string) bool {
	if !ValidDigest(digest) {
		return false
	}
	fi, err := os.Stat(s.Path(digest))
	return err == nil && fi.Mode().IsRegular()
}

// Fetch makes sure the bundle with this digest is in the store, downloading
// it from url when it is not, and returns its path. size is the expected
// length in bytes (0 when unknown; the bundle size cap applies then).
//
// A cut download leaves its .part file; the next Fetch resumes it with a
// Range request. A server that ignores Range (200 instead of 206) is
// handled by starting over. On a digest or size mismatch the .part file is
// deleted and ErrDigestMismatch returned.
func (s *Store) Fetch(ctx context.Context, url, digest string, size int64) (string, error) {
	if !ValidDigest(digest) {
		return "", fmt.Errorf("bundle digest %q is not 64 lowercase hex digits; the desired state is malformed", digest)
	}
	if size < 0 || size > s.maxSize() {
		return "", fmt.Errorf("bundle %s: size %d is outside 0..%d", digest, size, s.maxSize())
	}
	if s.Has(digest) {
		return s.Path(digest), nil
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return "", fmt.Errorf("bundle store: %w", err)
	}
	part := s.partPath(digest)
	if err := s.download(ctx, url, part, size); err != nil {
		return "", fmt.Errorf("download %s: %w", url, err)
	}
	if err := verify(part, digest, size); err != nil {
		os.Remove(part)
		return "", fmt.Errorf("download %s: %w", url, err)
	}
	final := s.Path(digest)
	if err := os.Rename(part, final); err != nil {
		return "", fmt.Errorf("bundle store: %w", err)
	}
	durable.SyncDir(s.Dir) // best effort: the file itself was synced
	return final, nil
}

// Remove deletes a stored bundle and any partial download of it.
func (s *Store) Remove(digest string) error {
	if !ValidDigest(digest) {
		return nil
	}
	os.Remove(s.partPath(digest))
	if err := os.Remove(s.Path(digest)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Prune deletes every bundle and partial download whose digest is not in
// keep, and returns the digests it deleted.
func (s *Store) Prune(keep map[string]bool) ([]string, error) {
	entries, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var gone []string
	for _, e := range entries {
		name := e.Name()
		d, ok := strings.CutSuffix(name, ".bundle")
		if !ok {
			d, ok = strings.CutSuffix(name, ".part")
		}
		if !ok || !ValidDigest(d) || keep[d] {
			continue
		}
		if err := os.Remove(filepath.Join(s.Dir, name)); err == nil {
			gone = append(gone, name)
		}
	}
	return gone, nil
}

func (s *Store) download(ctx context.Context, url, part string, size int64) error {
	f, err := os.OpenFile(part, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	off, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	limit := size
	if limit == 0 {
		limit = s.maxSize()
	}
	if off > limit {
		// Longer than the bundle can be: a stale part of something else.
		if err := f.Truncate(0); err != nil {
			return err
		}
		off = 0
	}
	if size > 0 && off == size {
		return nil // complete already; verify decides
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if off > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-")
	}
	client := s.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, err := contentRangeStart(resp.Header.Get("Content-Range"))
		if err != nil || start != off {
			f.Truncate(0)
			return fmt.Errorf("server answered range %d- with Content-Range %q; will start over", off, resp.Header.Get("Content-Range"))
		}
	case http.StatusOK:
		if off > 0 {
			s.logger().Info("server ignored the range request; downloading from the start", "url", url, "had", off)
		}
		if err := f.Truncate(0); err != nil {
			return err
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
		off = 0
	case http.StatusRequestedRangeNotSatisfiable:
		// What we hold is at least as long as the file: start over next time.
		if err := f.Truncate(0); err != nil {
			return err
		}
		return fmt.Errorf("server says range %d- is past the end; partial file discarded", off)
	default:
		return fmt.Errorf("server answered %s; check that the controller has this bundle", resp.Status)
	}
	// Read one byte past the limit so an oversized body is noticed.
	n, err := io.Copy(f, io.LimitReader(resp.Body, limit-off+1))
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("cut after %d bytes: %w", off+n, err)
	}
	if off+n > limit {
		f.Truncate(0)
		return fmt.Errorf("%w: more than %d bytes", ErrTooLarge, limit)
	}
	return nil
}

func (s *Store) logger() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

// contentRangeStart parses the first byte position of "bytes a-b/n".
func contentRangeStart(h string) (int64, error) {
	rest, ok := strings.CutPrefix(h, "bytes ")
	if !ok {
		return 0, fmt.Errorf("content-range %q", h)
	}
	a, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, fmt.Errorf("content-range %q", h)
	}
	return strconv.ParseInt(a, 10, 64)
}

func verify(path, digest string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return err
	}
	got := hex.EncodeToString(h.Sum(nil))
	if (size > 0 && n != size) || got != digest {
		return fmt.Errorf("%w: got %d bytes with sha256 %s, want %d bytes with %s", ErrDigestMismatch, n, got, size, digest)
	}
	return nil
}
