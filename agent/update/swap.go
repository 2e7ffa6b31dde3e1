package update

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/minio/selfupdate"

	"github.com/edgefleet/edgefleet/agent/internal/durable"
)

// OldPath is where the previous binary is kept beside exe.
func OldPath(exe string) string { return exe + ".old" }

// newPath is where minio/selfupdate stages the new binary.
func newPath(exe string) string {
	return filepath.Join(filepath.Dir(exe), "."+filepath.Base(exe)+".new")
}

// stage writes the verified release file src to .NAME.new with
// minio/selfupdate, which checks its SHA-256 once more, and fsyncs it.
// selfupdate's own commit is not used: it renames NAME away before it
// renames the new file in, which leaves a moment with no NAME at all, and
// it syncs nothing (see keepOld and swapIn).
func stage(exe, src string, sum []byte) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := selfupdate.PrepareAndCheckBinary(f, selfupdate.Options{TargetPath: exe, Checksum: sum, TargetMode: 0o755}); err != nil {
		os.Remove(newPath(exe))
		return fmt.Errorf("stage the new binary beside %s: %w", exe, err)
	}
	if err := fsyncFile(newPath(exe)); err != nil {
		return fmt.Errorf("stage the new binary: %w", err)
	}
	return nil
}

// keepOld makes NAME.old the same file as NAME (a hard link, or a copy
// where links are not possible), replacing any older NAME.old by rename.
func keepOld(exe string) error {
	return replaceWith(exe, OldPath(exe), exe+".old.tmp")
}

// swapIn puts the staged binary in place: one rename over NAME.
func swapIn(exe string) error {
	if err := os.Rename(newPath(exe), exe); err != nil {
		return fmt.Errorf("swap in the new binary: %w", err)
	}
	return durable.SyncDir(filepath.Dir(exe))
}

// restoreOld puts NAME.old back as NAME, keeping NAME.old.
func restoreOld(exe string) error {
	if _, err := os.Stat(OldPath(exe)); err != nil {
		return fmt.Errorf("restore the previous binary: %w", err)
	}
	return replaceWith(OldPath(exe), exe, exe+".restore.tmp")
}

// replaceWith makes dst the file src, through tmp and one rename.
func replaceWith(src, dst, tmp string) error {
	os.Remove(tmp)
	if err := os.Link(src, tmp); err != nil {
		if err := copyFile(src, tmp); err != nil {
			os.Remove(tmp)
			return fmt.Errorf("copy %s to %s: %w", src, tmp, err)
		}
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s to %s: %w", tmp, dst, err)
	}
	return durable.SyncDir(filepath.Dir(dst))
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func fsyncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// isOld reports whether NAME is (still, or again) the previous binary.
func isOld(exe string) (bool, error) {
	a, err := os.Stat(exe)
	if err != nil {
		return false, err
	}
	b, err := os.Stat(OldPath(exe))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if os.SameFile(a, b) {
		return true, nil
	}
	if a.Size() != b.Size() {
		return false, nil
	}
	// A copy (no hard links on this file system): compare the bytes.
	ha, err := fileSum(exe)
	if err != nil {
		return false, err
	}
	hb, err := fileSum(OldPath(exe))
	return err == nil && bytes.Equal(ha, hb), err
}

func fileSum(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// BinaryVersion runs path --version and returns the version it prints
// ("fleet-agent 1.2.0" -> "1.2.0"). It proves a binary starts on this
// device before it replaces the running one, and lets tests check that a
// binary on disk runs.
func BinaryVersion(ctx context.Context, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w (output %q)", path, err, truncate(string(out), 200))
	}
	f := strings.Fields(string(out))
	if len(f) != 2 || f[0] != "fleet-agent" {
		return "", fmt.Errorf("%s --version printed %q; want \"fleet-agent VERSION\"", path, truncate(string(out), 200))
	}
	return f[1], nil
}

// PrecompileTimeout bounds RunPrecompile: compiling a large module on a
// busy device takes seconds, and the update waits for it.
const PrecompileTimeout = 2 * time.Minute

// RunPrecompile runs `exe precompile --data DATA DIGEST...`: the binary
// exe compiles the stored bundles named by digests into the compilation
// cache under dataDir with its own wazero. A binary without the
// subcommand (a release older than it) refuses the argument and fails.
func RunPrecompile(ctx context.Context, exe, dataDir string, digests []string) error {
	ctx, cancel := context.WithTimeout(ctx, PrecompileTimeout)
	defer cancel()
	args := append([]string{"precompile", "--data", dataDir}, digests...)
	out, err := exec.CommandContext(ctx, exe, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s precompile: %w (output %q)", exe, err, truncate(string(out), 300))
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
