package registry

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/internal/durable"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/release"
)

// Agent releases are stored in three places, written in this order so
// that nothing ever names what is missing:
//
//  1. the binary, content-addressed like a bundle (artifacts/sha256/<digest>),
//     so agents download it resumably from /v1/artifacts/<digest>;
//  2. the signed release document, DATA/releases/<version>/<os>-<arch>.json;
//  3. a row in the store's model table, release.Model@<version> with the
//     synthetic digest release.Digest(version): the rollout engine plans,
//     records and rolls back an agent release exactly as a model version.
//
// The controller does not check the release signature: it does not hold
// the release keys (they may live offline), and the agent, which pins
// them, checks it before it replaces anything.

// ReleasesDir is the directory under the data directory holding the signed
// release documents.
const ReleasesDir = "releases"

// Release is one stored agent release for one platform.
type Release struct {
	Manifest release.Manifest
	// Document is the signed release document as pushed.
	Document  []byte
	CreatedAt time.Time
}

// ErrReleaseNotFound is wrapped when no release of a version and platform
// is stored.
var ErrReleaseNotFound = errors.New("agent release not stored")

func (r *Registry) releaseDir() string {
	return filepath.Join(filepath.Dir(filepath.Dir(r.dir)), ReleasesDir)
}

func (r *Registry) releasePath(m release.Manifest) string {
	return filepath.Join(r.releaseDir(), m.Version, m.OS+"-"+m.Arch+".json")
}

// PushRelease stores a signed agent release document and its binary, read
// from bin. It returns the stored release and whether it is new. Errors
// wrap release.ErrInvalid for a malformed document or a binary that does
// not match its manifest, and store.ErrConflict when the version and
// platform are stored with another binary.
func (r *Registry) PushRelease(ctx context.Context, doc []byte, bin io.Reader) (Release, bool, error) {
	_, m, err := release.Decode(doc)
	if err != nil {
		return Release{}, false, err
	}
	if old, err := r.readRelease(r.releasePath(m)); err == nil {
		if old.Manifest != m {
			return old, false, fmt.Errorf("agent release %s for %s is already stored with sha256 %s; release the new binary under a new version: %w",
				m.Version, m.Platform(), old.Manifest.SHA256, store.ErrConflict)
		}
		return old, false, nil
	}
	if err := r.storeBinary(m, bin); err != nil {
		return Release{}, false, err
	}
	path := r.releasePath(m)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return Release{}, false, fmt.Errorf("store agent release: %w", err)
	}
	if err := durable.WriteFile(path, doc); err != nil {
		return Release{}, false, fmt.Errorf("store agent release %s %s: %w", m.Version, m.Platform(), err)
	}
	_, _, err = r.store.PutModel(ctx, store.Model{
		Name: release.Model, Version: m.Version, Digest: release.Digest(m.Version),
		Manifest: []byte(`{"kind":"agent-release","version":"` + m.Version + `"}`),
	})
	if err != nil {
		return Release{}, false, err
	}
	r.log.Info("agent release stored", "version", m.Version, "os", m.OS, "arch", m.Arch, "sha256", m.SHA256, "size", m.Size)
	rel, err := r.readRelease(path)
	return rel, true, err
}

// storeBinary streams bin to a temporary file, checking its size and
// SHA-256 against m, and moves it into the artifact store.
func (r *Registry) storeBinary(m release.Manifest, bin io.Reader) error {
	if fi, err := os.Stat(r.path(m.SHA256)); err == nil && fi.Size() == m.Size {
		// Stored already (another version of the same bytes): the upload
		// must still be the signed binary, or the operator signed one file
		// and sent another.
		return checkBinary(m, io.Discard, bin)
	}
	f, err := os.CreateTemp(r.dir, m.SHA256+".*.part")
	if err != nil {
		return fmt.Errorf("store agent binary: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	err = checkBinary(m, f, bin)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, r.path(m.SHA256)); err != nil {
		return fmt.Errorf("store agent binary: %w", err)
	}
	return nil
}

// checkBinary copies bin to w and checks it is the binary m pins.
func checkBinary(m release.Manifest, w io.Writer, bin io.Reader) error {
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(w, h), io.LimitReader(bin, m.Size+1))
	if err != nil {
		return fmt.Errorf("store agent binary: %w", err)
	}
	if n != m.Size {
		return fmt.Errorf("%w: the binary is %d bytes or more, but the signed manifest pins %d; sign the binary you upload", release.ErrInvalid, n, m.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != m.SHA256 {
		return fmt.Errorf("%w: the binary's sha256 is %s but the signed manifest pins %s; sign the binary you upload", release.ErrInvalid, got, m.SHA256)
	}
	return nil
}

func (r *Registry) readRelease(path string) (Release, error) {
	f, err := os.Open(path)
	if err != nil {
		return Release{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Release{}, err
	}
	doc, err := io.ReadAll(io.LimitReader(f, release.MaxDocument+1))
	if err != nil {
		return Release{}, err
	}
	_, m, err := release.Decode(doc)
	if err != nil {
		return Release{}, fmt.Errorf("stored agent release %s: %w", path, err)
	}
	return Release{Manifest: m, Document: doc, CreatedAt: fi.ModTime()}, nil
}

// Release returns the stored release of version for goos/goarch; the error
// wraps ErrReleaseNotFound when there is none.
func (r *Registry) Release(version, goos, goarch string) (Release, error) {
	if !release.ValidVersion(version) || !release.ValidPlatform(goos) || !release.ValidPlatform(goarch) {
		return Release{}, fmt.Errorf("agent release %s %s/%s: %w (malformed version or platform)", version, goos, goarch, ErrReleaseNotFound)
	}
	rel, err := r.readRelease(r.releasePath(release.Manifest{Version: version, OS: goos, Arch: goarch}))
	if errors.Is(err, fs.ErrNotExist) {
		return Release{}, fmt.Errorf("agent release %s %s/%s: %w; push it with fleet agent release push", version, goos, goarch, ErrReleaseNotFound)
	}
	return rel, err
}

// Releases lists every stored release, by version then platform.
func (r *Registry) Releases(ctx context.Context) ([]Release, error) {
	var out []Release
	err := filepath.WalkDir(r.releaseDir(), func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasSuffix(path, ".json") || strings.HasPrefix(d.Name(), ".") {
			return nil
		}
		rel, err := r.readRelease(path)
		if err != nil {
			r.log.Warn("unreadable agent release skipped", "file", path, "err", err)
			return nil
		}
		out = append(out, rel)
		return ctx.Err()
	})
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i].Manifest, out[j].Manifest
		if a.Version != b.Version {
			return a.Version < b.Version
		}
		return a.Platform() < b.Platform()
	})
	return out, err
}

// MarshalJSON writes a release as the API shows it.
func (rel Release) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Version   string    `json:"version"`
		OS        string    `json:"os"`
		Arch      string    `json:"arch"`
		SHA256    string    `json:"sha256"`
		Size      int64     `json:"size"`
		CreatedAt time.Time `json:"createdAt"`
	}{rel.Manifest.Version, rel.Manifest.OS, rel.Manifest.Arch, rel.Manifest.SHA256, rel.Manifest.Size, rel.CreatedAt})
}
