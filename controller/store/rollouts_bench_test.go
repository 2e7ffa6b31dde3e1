package store

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkCommitRolloutWave commits one rollout decision that notifies
// 5,000 devices: their steps and their desired states in one transaction.
func BenchmarkCommitRolloutWave(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir()+"/"+FileName)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const n = 5000
	const extra = 5000
	var hs []Hello
	for i := range n + extra {
		hs = append(hs, Hello{ID: fmt.Sprintf("d%05d", i), Labels: map[string]string{"a": "b"}, At: time.Now()})
	}
	if err := s.UpsertHellos(ctx, hs); err != nil {
		b.Fatal(err)
	}
	digest := strings.Repeat("a", 64)
	if _, _, err := s.PutModel(ctx, Model{Name: "m", Version: "2", Digest: digest, Size: 1000, Manifest: []byte("{}")}); err != nil {
		b.Fatal(err)
	}
	build := func(d *Desired) error { d.Doc = make([]byte, 300); return nil }
	ro := Rollout{ID: "r", Spec: []byte("{}"), Slot: "default", Model: "m", Version: "2", Phase: "running", Targets: n, Open: true, Revision: 1, CreatedAt: time.Now(), UpdatedAt: time.Now()}
	c := RolloutCommit{Rollout: ro, Create: true}
	for i := range n {
		c.Devices = append(c.Devices, RolloutDevice{DeviceID: hs[i].ID, Order: i, Step: "pending"})
	}
	if _, err := s.CommitRollout(ctx, c, build); err != nil {
		b.Fatal(err)
	}
	h := &HealthPolicy{WatchMS: 1000}
	var ru0, ru1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	defer func() {
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
		cpu := time.Duration(ru1.Utime.Nano()+ru1.Stime.Nano()-ru0.Utime.Nano()-ru0.Stime.Nano()) / time.Duration(b.N)
		b.ReportMetric(float64(cpu)/1e6, "cpu-ms/op")
	}()
	b.ResetTimer()
	for i := range b.N {
		c := RolloutCommit{Rollout: ro}
		c.Rollout.Revision = uint64(i + 2)
		for j := range n {
			c.Devices = append(c.Devices, RolloutDevice{DeviceID: hs[j].ID, Order: j, Step: "notified", StepAt: time.Now(), PrevModel: "m", PrevVersion: "1", PrevDigest: digest, PrevSize: 10})
			c.Desired = append(c.Desired, SlotChange{DeviceID: hs[j].ID, Slot: "default", Set: &DesiredSlot{Model: "m", Version: "2", Digest: digest, Size: 1000, RolloutID: "r", Health: h}})
		}
		if _, err := s.CommitRollout(ctx, c, build); err != nil {
			b.Fatal(err)
		}
	}
}
