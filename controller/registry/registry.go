// Package registry is the controller's model registry: it accepts bundle
// files, checks them with bundle.Decode, stores each file once under its
// SHA-256 (DATA/artifacts/sha256/<digest>) and records name@version in the
// store. Artifacts are immutable, which is what lets agents resume
// downloads with Range requests and cache them by digest.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"

	"github.com/edgefleet/edgefleet/controller/internal/durable"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/proto/release"
)

// ErrBadDigest is wrapped when an artifact is asked for by something that
// is not a lowercase hex SHA-256.
var ErrBadDigest = errors.New("not a sha256 digest")

// Store is what the registry needs from the controller's store.
type Store interface {
	PutModel(ctx context.Context, m store.Model) (store.Model, bool, error)
	Model(ctx context.Context, name, version string) (store.Model, error)
	Models(ctx context.Context) ([]store.Model, error)
}

// Registry stores bundles and their metadata.
type Registry struct {
	dir   string
	store Store
	log   *slog.Logger
}

var digestRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// New returns a registry keeping artifacts under dataDir/artifacts/sha256.
func New(dataDir string, st Store, log *slog.Logger) (*Registry, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir := filepath.Join(dataDir, "artifacts", "sha256")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("artifact directory: %w", err)
	}
	return &Registry{dir: dir, store: st, log: log}, nil
}

// Push checks a bundle file and stores it. It returns the stored model and
// whether it is new. The error wraps bundle.ErrInvalid for a bad bundle and
// store.ErrConflict when name@version exists with another digest.
func (r *Registry) Push(ctx context.Context, data []byte) (store.Model, bool, error) {
	b, err := bundle.Decode(data)
	if err != nil {
		return store.Model{}, false, err
	}
	// The file goes to disk before the row goes in, so the store never
	// names an artifact that is missing.
	if err := r.writeArtifact(b.Digest, data); err != nil {
		return store.Model{}, false, err
	}
	m, created, err := r.store.PutModel(ctx, store.Model{
		Name:     b.Manifest.Name,
		Version:  b.Manifest.Version,
		Digest:   b.Digest,
		Size:     int64(len(data)),
		Manifest: b.ManifestJSON,
	})
	if err != nil {
		return m, false, err
	}
	if created {
		r.log.Info("model stored", "model", m.Name, "version", m.Version, "digest", m.Digest, "size", m.Size)
	}
	return m, created, nil
}

// writeArtifact stores data under its digest: write a temporary file, sync,
// rename, so a reader never sees a partial artifact.
func (r *Registry) writeArtifact(digest string, data []byte) error {
	path := r.path(digest)
	if fi, err := os.Stat(path); err == nil && fi.Size() == int64(len(data)) {
		return nil
	}
	if err := durable.WriteFile(path, data); err != nil {
		return fmt.Errorf("store artifact %s: %w", digest, err)
	}
	return nil
}

func (r *Registry) path(digest string) string { return filepath.Join(r.dir, digest) }

// Open opens the artifact with the given digest. The error wraps
// ErrBadDigest for a malformed digest and os.ErrNotExist for an unknown one.
func (r *Registry) Open(digest string) (*os.File, error) {
	if !digestRE.MatchString(digest) {
		return nil, fmt.Errorf("artifact %q: %w; use the 64 lowercase hex digits of the bundle's SHA-256", digest, ErrBadDigest)
	}
	return os.Open(r.path(digest))
}

// Model returns name@version; the error wraps store.ErrNotFound if unknown.
func (r *Registry) Model(ctx context.Context, name, version string) (store.Model, error) {
	return r.store.Model(ctx, name, version)
}

// Models lists every stored model. The rows that stand for agent
// releases (release.Model) are left out: Releases lists those.
func (r *Registry) Models(ctx context.Context) ([]store.Model, error) {
	ms, err := r.store.Models(ctx)
	if err != nil {
		return nil, err
	}
	out := ms[:0]
	for _, m := range ms {
		if m.Name != release.Model {
			out = append(out, m)
		}
	}
	return out, nil
}
