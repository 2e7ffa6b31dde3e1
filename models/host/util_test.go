package host_test

import (
	"io/fs"
	"path/filepath"
	"testing"
)

// filepathWalk calls f once per regular file under dir.
func filepathWalk(t *testing.T, dir string, f func()) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			f()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
