package store

import (
	"context"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestCommitRollout(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	var hs []Hello
	for i := range 5 {
		hs = append(hs, Hello{ID: fmt.Sprintf("d%d", i), Labels: map[string]string{"site": fmt.Sprint(i % 2)}, At: t0})
	}
	if err := s.UpsertHellos(ctx, hs); err != nil {
		t.Fatal(err)
	}
	// d4's agent already accepted generation 9.
	if err := s.UpdateReports(ctx, []DeviceReport{{ID: "d4", At: t0, Report: Report{State: []byte{1}, ReportedGeneration: 9}}}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"1", "2"} {
		if _, _, err := s.PutModel(ctx, Model{Name: "m", Version: v, Digest: strings.Repeat(v, 64), Size: 10, Manifest: []byte("{}")}); err != nil {
			t.Fatal(err)
		}
	}
	builds := 0
	build := func(d *Desired) error {
		d.Doc = fmt.Appendf(nil, "%s/%d/%v", d.DeviceID, d.Generation, d.Slots)
		return nil
	}
	ro := Rollout{ID: "r", Spec: []byte(`{}`), Slot: "default", Model: "m", Version: "2", Phase: "running", Targets: 5, Open: true,
		Revision: 1, CreatedAt: t0, UpdatedAt: t0}
	health := &HealthPolicy{WatchMS: 500, MaxErrorRate: 0.1}
	set := &DesiredSlot{Model: "m", Version: "2", Digest: strings.Repeat("2", 64), Size: 10, RolloutID: "r", Health: health}
	c := RolloutCommit{Rollout: ro, Create: true,
		Waves:   []RolloutWave{{Index: 0, SpecIndex: 0, Size: 2, State: "running", StartedAt: t0}, {Index: 1, SpecIndex: 2, Size: 3, State: "pending"}},
		History: []string{"created", "wave 1 started"},
	}
	for i, h := range hs {
		step := "pending"
		if i == 0 || i == 4 {
			step = "notified"
			c.Desired = append(c.Desired, SlotChange{DeviceID: h.ID, Slot: "default", Set: set})
		}
		c.Devices = append(c.Devices, RolloutDevice{DeviceID: h.ID, Wave: i / 2, Order: i, Stratum: h.Labels["site"], Step: step, StepAt: t0,
			PrevModel: "m", PrevVersion: "1", PrevDigest: strings.Repeat("1", 64), PrevSize: 10})
	}
	docs, err := s.CommitRollout(ctx, c, func(d *Desired) error { builds++; return build(d) })
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) != 2 || docs[0].DeviceID != "d0" || docs[0].Generation != 1 || docs[1].Generation != 10 || builds != 2 {
		t.Fatalf("docs = %+v, builds %d", docs, builds)
	}
	got, err := s.Rollout(ctx, "r")
	if err != nil || got.Phase != "running" || got.Revision != 1 || !got.Open || !got.CreatedAt.Equal(t0) {
		t.Fatalf("Rollout = %+v, %v", got, err)
	}
	devs, err := s.RolloutDevices(ctx, "r")
	if err != nil || len(devs) != 5 || devs[0].Generation != 1 || devs[4].Generation != 10 || devs[3].Stratum != "1" || devs[1].PrevSize != 10 {
		t.Fatalf("RolloutDevices = %+v, %v", devs, err)
	}
	d0, _ := s.Device(ctx, "d0")
	if sl := d0.Desired.Slots; len(sl) != 1 || sl[0].RolloutID != "r" || !reflect.DeepEqual(sl[0].Health, health) {
		t.Fatalf("desired slots of d0 = %+v", sl)
	}

	// A commit whose revision does not follow is refused whole.
	stale := RolloutCommit{Rollout: ro, Desired: []SlotChange{{DeviceID: "d1", Slot: "default", Set: set}}}
	stale.Rollout.Revision = 5
	if _, err := s.CommitRollout(ctx, stale, build); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale commit: %v", err)
	}
	if d1, _ := s.Device(ctx, "d1"); d1.Desired != nil {
		t.Fatal("a refused commit issued a desired state")
	}
	if _, err := s.CommitRollout(ctx, c, build); !errors.Is(err, ErrConflict) {
		t.Fatalf("second create: %v", err)
	}

	// Next decision: roll d0 back (rollback flag) and remove d4's slot.
	next := RolloutCommit{Rollout: ro}
	next.Rollout.Revision, next.Rollout.Phase, next.Rollout.Reason, next.Rollout.UpdatedAt = 2, "rolling-back", "budget", t0.Add(time.Minute)
	next.Devices = []RolloutDevice{devs[0], devs[4]}
	next.Devices[0].Step, next.Devices[1].Step = "rolling-back", "rolling-back"
	next.Desired = []SlotChange{
		{DeviceID: "d0", Slot: "default", Set: &DesiredSlot{Model: "m", Version: "1", Digest: strings.Repeat("1", 64), Size: 10, RolloutID: "r", Rollback: true}},
		{DeviceID: "d4", Slot: "default"},
	}
	next.Waves = []RolloutWave{{Index: 0, SpecIndex: 0, Size: 2, State: "failed", StartedAt: t0, FinishedAt: t0.Add(time.Minute), Verdicts: []byte(`[{"gate":"x"}]`)}}
	next.History = []string{"rolling back"}
	if docs, err = s.CommitRollout(ctx, next, build); err != nil || len(docs) != 2 || docs[0].Generation != 2 || docs[1].Generation != 11 || len(docs[1].Slots) != 0 {
		t.Fatalf("rollback commit = %+v, %v", docs, err)
	}
	d0, _ = s.Device(ctx, "d0")
	if sl := d0.Desired.Slots; len(sl) != 1 || sl[0].Version != "1" || !sl[0].Rollback || sl[0].Health != nil {
		t.Fatalf("d0 after rollback = %+v", sl)
	}
	if d4, _ := s.Device(ctx, "d4"); len(d4.Desired.Slots) != 0 || d4.Desired.Generation != 11 {
		t.Fatalf("d4 after removal = %+v", d4.Desired)
	}
	waves, _ := s.RolloutWaves(ctx, "r")
	if len(waves) != 2 || waves[0].State != "failed" || string(waves[0].Verdicts) != `[{"gate":"x"}]` || waves[1].SpecIndex != 2 {
		t.Fatalf("waves = %+v", waves)
	}
	counts, _ := s.RolloutStepCounts(ctx, "r")
	want := []StepCount{{Wave: 0, Step: "pending", N: 1}, {Wave: 0, Step: "rolling-back", N: 1}, {Wave: 1, Step: "pending", N: 2}, {Wave: 2, Step: "rolling-back", N: 1}}
	if !reflect.DeepEqual(counts, want) {
		t.Fatalf("step counts = %+v, want %+v", counts, want)
	}
	hist, _ := s.RolloutHistory(ctx, "r", 2)
	if len(hist) != 2 || hist[0].Message != "wave 1 started" || hist[1].Message != "rolling back" {
		t.Fatalf("history = %+v", hist)
	}
	list, _ := s.Rollouts(ctx, true)
	if len(list) != 1 || list[0].Phase != "rolling-back" {
		t.Fatalf("open rollouts = %+v", list)
	}

	// An unknown model names itself, and nothing is written.
	bad := RolloutCommit{Rollout: next.Rollout, Desired: []SlotChange{{DeviceID: "d2", Slot: "default", Set: &DesiredSlot{Model: "m", Version: "9", Digest: "x"}}}}
	bad.Rollout.Revision = 3
	if _, err := s.CommitRollout(ctx, bad, build); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "m@9") {
		t.Fatalf("unknown model: %v", err)
	}
	if got, _ := s.Rollout(ctx, "r"); got.Revision != 2 {
		t.Fatalf("a failed commit moved the revision to %d", got.Revision)
	}
}

func TestDeviceBriefsEventsAndSamples(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	if err := s.UpsertHello(ctx, Hello{ID: "b", Labels: map[string]string{"k": "v"}, At: t0, Report: &Report{State: []byte{7}, ReportedGeneration: 3}}); err != nil {
		t.Fatal(err)
	}
	if err := s.UpsertHello(ctx, Hello{ID: "a", At: t0}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.PutModel(ctx, Model{Name: "m", Version: "1", Digest: strings.Repeat("1", 64), Size: 3, Manifest: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Assign(ctx, []string{"b"}, DesiredSlot{Slot: "default", Model: "m", Version: "1", Digest: strings.Repeat("1", 64), Size: 3},
		t0, func(d *Desired) error { d.Doc = []byte("x"); return nil }); err != nil {
		t.Fatal(err)
	}
	all, err := s.DeviceBriefs(ctx, "default", nil)
	if err != nil || len(all) != 2 || all[0].ID != "a" || all[0].Desired != nil || all[1].Desired.Version != "1" || all[1].Labels["k"] != "v" ||
		all[1].ReportedGeneration != 3 || string(all[1].State) != "\x07" || !all[1].Online {
		t.Fatalf("DeviceBriefs(all) = %+v, %v", all, err)
	}
	some, err := s.DeviceBriefs(ctx, "other", []string{"b", "ghost"})
	if err != nil || len(some) != 1 || some[0].Desired != nil {
		t.Fatalf("DeviceBriefs(b, ghost) = %+v, %v", some, err)
	}

	for i, e := range []Event{{DeviceID: "a", Kind: "downloading", RolloutID: "r"}, {DeviceID: "b", Kind: "refused"}, {DeviceID: "a", Kind: "activated", RolloutID: "q"}} {
		e.At = t0.Add(time.Duration(i) * time.Second)
		if err := s.AppendEvent(ctx, e, t0); err != nil {
			t.Fatal(err)
		}
	}
	evs, err := s.EventsAfter(ctx, 0, nil, 10)
	if err != nil || len(evs) != 3 || evs[0].Kind != "downloading" || evs[0].ID >= evs[1].ID {
		t.Fatalf("EventsAfter = %+v, %v", evs, err)
	}
	if evs, _ := s.EventsAfter(ctx, evs[0].ID, nil, 1); len(evs) != 1 || evs[0].Kind != "refused" {
		t.Fatalf("EventsAfter(first, limit 1) = %+v", evs)
	}
	if evs, _ := s.EventsAfter(ctx, 0, []string{"q"}, 10); len(evs) != 1 || evs[0].Kind != "activated" {
		t.Fatalf("EventsAfter(rollout q) = %+v", evs)
	}
	if last, err := s.LastEventID(ctx); err != nil || last != evs[2].ID {
		t.Fatalf("LastEventID = %d, %v", last, err)
	}

	var recs []TelemetryRecord
	for i := range 6 {
		recs = append(recs, TelemetryRecord{Seq: uint64(i + 1), Kind: RecordInference, Model: "m", Version: "1", At: t0.Add(time.Duration(i) * time.Second), LatencyUS: uint32(100 * i)})
	}
	recs = append(recs, TelemetryRecord{Seq: 9, Kind: RecordInference, Model: "m", Version: "2", At: t0, LatencyUS: 5, Error: "boom"})
	if _, err := s.StoreTelemetry(ctx, "a", "e", t0, recs); err != nil {
		t.Fatal(err)
	}
	// Samples come from minute aggregates: the whole minute the window
	// touches, latencies within 10 % (their histogram bucket's middle).
	got, err := s.InferenceSamples(ctx, "m", "1", t0.Add(time.Second), t0.Add(4*time.Second), 10)
	if err != nil || len(got) != 6 || got[0].DeviceID != "a" {
		t.Fatalf("InferenceSamples = %+v, %v", got, err)
	}
	lat := make([]float64, len(got))
	for i, x := range got {
		lat[i] = float64(x.LatencyUS)
	}
	slices.Sort(lat)
	for i, v := range lat {
		if want := float64(100 * i); math.Abs(v-want) > 0.1*want+1 {
			t.Errorf("latency %d reads back as %v, want about %v", i, v, want)
		}
	}
	if got, _ := s.InferenceSamples(ctx, "m", "1", t0, t0, 3); len(got) != 3 {
		t.Fatalf("InferenceSamples(limit 3) = %+v", got)
	}
	if got, _ := s.InferenceSamples(ctx, "m", "1", t0.Add(time.Minute), t0.Add(2*time.Minute), 10); len(got) != 0 {
		t.Fatalf("InferenceSamples(next minute) = %+v", got)
	}
	if got, _ := s.InferenceSamples(ctx, "m", "2", t0, t0, 10); len(got) != 1 || got[0].Error == "" {
		t.Fatalf("InferenceSamples(v2) = %+v", got)
	}
}

// TestIssueDesiredBuildsInParallel issues enough desired states to build
// them on several goroutines; every document is built once, for its own
// device and generation, and an error in any build fails the whole issue.
func TestIssueDesiredBuildsInParallel(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	var hs []Hello
	var ids []string
	for i := range 300 {
		id := fmt.Sprintf("p%03d", i)
		hs, ids = append(hs, Hello{ID: id, At: t0}), append(ids, id)
	}
	if err := s.UpsertHellos(ctx, hs); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.PutModel(ctx, Model{Name: "m", Version: "1", Digest: strings.Repeat("1", 64), Size: 3, Manifest: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	slot := DesiredSlot{Slot: "default", Model: "m", Version: "1", Digest: strings.Repeat("1", 64), Size: 3}
	docs, err := s.Assign(ctx, ids, slot, t0, func(d *Desired) error {
		d.Doc = fmt.Appendf(nil, "%s@%d", d.DeviceID, d.Generation)
		return nil
	})
	if err != nil || len(docs) != 300 {
		t.Fatalf("Assign = %d docs, %v", len(docs), err)
	}
	for i, d := range docs {
		if d.DeviceID != ids[i] || string(d.Doc) != ids[i]+"@1" {
			t.Fatalf("doc %d = %s %q", i, d.DeviceID, d.Doc)
		}
	}
	boom := errors.New("no key")
	_, err = s.Assign(ctx, ids, slot, t0, func(d *Desired) error {
		if d.DeviceID == "p277" {
			return boom
		}
		return nil
	})
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "p277") {
		t.Fatalf("failed build: %v", err)
	}
	if d, _ := s.DesiredState(ctx, "p001"); d.Generation != 1 {
		t.Fatalf("a failed issue changed p001: generation %d", d.Generation)
	}
}
