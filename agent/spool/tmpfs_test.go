package spool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// TestSQLiteOnSmallFilesystem runs a capped spool on a real 1 MiB tmpfs, a
// disk that really fills up, where the process may mount one (root in a
// container or VM; skipped elsewhere). With the cap at a quarter of the
// filesystem (the rule: at most half its free space, the WAL needs the
// rest), the disk never fills: every append succeeds and room is made by
// the drop policy.
func TestSQLiteOnSmallFilesystem(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount a tmpfs here (%v); TestSQLiteMaxBytes covers the cap without one", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil && !errors.Is(err, syscall.EINVAL) {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	ctx := t.Context()
	s, err := OpenSQLiteOptions(ctx, filepath.Join(dir, "spool.db"), SQLiteOptions{MaxBytes: MinMaxBytes})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Append(ctx, []*pb.TelemetryRecord{ev(1), agg(2)}); err != nil {
		t.Fatal(err)
	}
	appended := uint64(2)
	for b := range 80 {
		batch := []*pb.TelemetryRecord{sample(b, 2000)}
		for i := range 60 {
			batch = append(batch, inf("m", b*60+i))
		}
		if err := s.Append(ctx, batch); err != nil {
			t.Fatalf("batch %d on a 1 MiB filesystem with a %d byte cap: %v%s", b, MinMaxBytes, err, listing(dir))
		}
		appended += uint64(len(batch))
	}
	st := mustStats(t, s)
	if st.DroppedRaw == 0 || st.DroppedInference == 0 || st.DroppedAggregate != 0 || st.DroppedEvent != 0 || st.Depth+st.Dropped != appended {
		t.Fatalf("stats %+v after %d appended: want samples and inference records dropped, nothing else, nothing unaccounted", st, appended)
	}
}

func listing(dir string) string {
	out := ""
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		if fi, err := e.Info(); err == nil {
			out += fmt.Sprintf("\n  %s %d bytes", e.Name(), fi.Size())
		}
	}
	return out
}
