package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func open(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(context.Background(), path, WithClock(func() time.Time { return t0 }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newStore(t *testing.T) *Store {
	return open(t, filepath.Join(t.TempDir(), FileName))
}

func TestMigrations(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	s := open(t, path)
	v, err := s.SchemaVersion(ctx)
	if err != nil || v != len(migrations) {
		t.Fatalf("SchemaVersion = %d, %v; want %d", v, err, len(migrations))
	}
	var mode string
	if err := s.db.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v", mode, err)
	}
	var fk int
	if err := s.db.QueryRowContext(ctx, `PRAGMA foreign_keys`).Scan(&fk); err != nil || fk != 1 {
		t.Fatalf("foreign_keys = %d, %v", fk, err)
	}
	s.Close()

	// Reopening applies nothing twice.
	s = open(t, path)
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil || n != len(migrations) {
		t.Fatalf("schema_migrations rows = %d, %v", n, err)
	}
	// A database from a newer controller is refused, not damaged.
	if _, err := s.db.ExecContext(ctx, `INSERT INTO schema_migrations VALUES (?, 0)`, len(migrations)+1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open(ctx, path); err == nil || !strings.Contains(err.Error(), "newer than this controller") {
		t.Fatalf("Open of a newer schema: %v", err)
	}
}

func TestOpenUnwritableDir(t *testing.T) {
	_, err := Open(context.Background(), filepath.Join(t.TempDir(), "missing", "dir", FileName))
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("Open in a missing dir: %v", err)
	}
}

func TestDevices(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	at := t0.Add(time.Minute)
	err := s.UpsertHello(ctx, Hello{
		ID: "dev-b", Labels: map[string]string{"region": "eu"}, AgentVersion: "1.0.0", OS: "linux", Arch: "arm64", At: at,
		Report: &Report{State: []byte{1, 2}, Health: HealthOK, ReportedGeneration: 4, SpoolDepth: 7},
	})
	if err != nil {
		t.Fatal(err)
	}
	// Messages before a hello create the device too.
	if err := s.SetPresence(ctx, "dev-a", false, at); err != nil {
		t.Fatal(err)
	}
	d, err := s.Device(ctx, "dev-b")
	if err != nil {
		t.Fatal(err)
	}
	if d.Labels["region"] != "eu" || d.AgentVersion != "1.0.0" || d.OS != "linux" || d.Arch != "arm64" || !d.Online ||
		!d.LastSeen.Equal(at) || d.Health != HealthOK || d.ReportedGeneration != 4 || d.SpoolDepth != 7 ||
		!bytes.Equal(d.State, []byte{1, 2}) || d.Desired != nil || len(d.LastEvents) != 0 {
		t.Fatalf("device after hello = %+v", d)
	}

	// A report updates state; an empty agent version keeps the known one;
	// last seen never goes backwards.
	if err := s.UpdateReport(ctx, "dev-b", at.Add(-time.Hour), Report{State: []byte{3}, Health: HealthDegraded, ReportedGeneration: 5, SpoolDepth: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPresence(ctx, "dev-b", false, at.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	d, _ = s.Device(ctx, "dev-b")
	if d.Health != HealthDegraded || d.ReportedGeneration != 5 || d.AgentVersion != "1.0.0" || d.Online || !d.LastSeen.Equal(at.Add(time.Second)) {
		t.Fatalf("device after report = %+v", d)
	}

	// Events: newest first, at most LastEventsLimit, per device.
	for i := range LastEventsLimit + 3 {
		e := Event{DeviceID: "dev-b", Kind: "activated", Slot: "default", Model: "m", Version: fmt.Sprintf("1.0.%d", i), At: at.Add(time.Duration(i) * time.Second)}
		if err := s.AppendEvent(ctx, e, at); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.AppendEvent(ctx, Event{DeviceID: "dev-a", Kind: "failed", Detail: "boom", At: at}, at); err != nil {
		t.Fatal(err)
	}
	devs, err := s.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 2 || devs[0].ID != "dev-a" || devs[1].ID != "dev-b" {
		t.Fatalf("Devices = %+v", devs)
	}
	if got := devs[1].LastEvents; len(got) != LastEventsLimit || got[0].Version != "1.0.12" || got[9].Version != "1.0.3" {
		t.Fatalf("dev-b events = %+v", got)
	}
	if got := devs[0].LastEvents; len(got) != 1 || got[0].Detail != "boom" {
		t.Fatalf("dev-a events = %+v", got)
	}
	one, _ := s.Device(ctx, "dev-b")
	if len(one.LastEvents) != LastEventsLimit || one.LastEvents[0].Version != "1.0.12" {
		t.Fatalf("Device events = %+v", one.LastEvents)
	}

	if err := s.UpsertHello(ctx, Hello{ID: "dev-a", At: at}); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkAllOffline(ctx); err != nil {
		t.Fatal(err)
	}
	devs, _ = s.Devices(ctx)
	for _, d := range devs {
		if d.Online {
			t.Fatalf("%s online after MarkAllOffline", d.ID)
		}
	}
	if _, err := s.Device(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Device(nope) = %v", err)
	}
}

func TestModels(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	m := Model{Name: "grid", Version: "1.0.0", Digest: strings.Repeat("a", 64), Size: 10, Manifest: []byte(`{"name":"grid"}`)}
	cases := []struct {
		name        string
		in          Model
		wantCreated bool
		wantErr     error
	}{
		{"new", m, true, nil},
		{"same again", m, false, nil},
		{"other digest", Model{Name: "grid", Version: "1.0.0", Digest: strings.Repeat("b", 64), Size: 1, Manifest: []byte(`{}`)}, false, ErrConflict},
		{"same digest other version", Model{Name: "grid", Version: "2.0.0", Digest: strings.Repeat("a", 64), Size: 1, Manifest: []byte(`{}`)}, false, ErrConflict},
		{"second version", Model{Name: "grid", Version: "1.1.0", Digest: strings.Repeat("c", 64), Size: 3, Manifest: []byte(`{}`)}, true, nil},
	}
	for _, c := range cases {
		got, created, err := s.PutModel(ctx, c.in)
		if !errors.Is(err, c.wantErr) || created != c.wantCreated {
			t.Fatalf("%s: PutModel = %+v, %v, %v; want created=%v err=%v", c.name, got, created, err, c.wantCreated, c.wantErr)
		}
		if err == nil && (got.Digest != c.in.Digest || got.CreatedAt.IsZero()) {
			t.Fatalf("%s: stored %+v", c.name, got)
		}
	}
	got, err := s.Model(ctx, "grid", "1.0.0")
	if err != nil || got.Digest != m.Digest || got.Size != 10 || string(got.Manifest) != `{"name":"grid"}` {
		t.Fatalf("Model = %+v, %v", got, err)
	}
	if _, err := s.Model(ctx, "grid", "9.9.9"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Model(unknown) = %v", err)
	}
	all, err := s.Models(ctx)
	if err != nil || len(all) != 2 || all[0].Version != "1.0.0" || all[1].Version != "1.1.0" {
		t.Fatalf("Models = %+v, %v", all, err)
	}
}

func TestAssign(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	for _, id := range []string{"d1", "d2"} {
		if err := s.UpsertHello(ctx, Hello{ID: id, At: t0}); err != nil {
			t.Fatal(err)
		}
	}
	// d2's agent already accepted generation 7 (say, from a controller whose
	// database was lost): the next one must be above it.
	if err := s.UpdateReport(ctx, "d2", t0, Report{ReportedGeneration: 7}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"1.0.0", "2.0.0"} {
		if _, _, err := s.PutModel(ctx, Model{Name: "m", Version: v, Digest: strings.Repeat(v[:1], 64), Size: 5, Manifest: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
	}
	build := func(d *Desired) error {
		d.Doc = fmt.Appendf(nil, "%s/%d/%d", d.DeviceID, d.Generation, len(d.Slots))
		return nil
	}
	slot := func(name, v string) DesiredSlot {
		return DesiredSlot{Slot: name, Model: "m", Version: v, Digest: strings.Repeat(v[:1], 64), Size: 5}
	}

	got, err := s.Assign(ctx, []string{"d1", "d2"}, slot("default", "1.0.0"), t0, build)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Generation != 1 || got[1].Generation != 8 || string(got[1].Doc) != "d2/8/1" {
		t.Fatalf("first Assign = %+v", got)
	}
	got, err = s.Assign(ctx, []string{"d1"}, slot("shadow", "2.0.0"), t0, build)
	if err != nil || got[0].Generation != 2 || len(got[0].Slots) != 2 {
		t.Fatalf("second Assign = %+v, %v", got, err)
	}
	got, err = s.Assign(ctx, []string{"d1"}, slot("default", "2.0.0"), t0, build)
	if err != nil || got[0].Generation != 3 {
		t.Fatalf("third Assign = %+v, %v", got, err)
	}
	d, _ := s.Device(ctx, "d1")
	if d.Generation != 3 || d.Desired == nil || d.Desired.Generation != 3 || d.Desired.Published || string(d.Desired.Doc) != "d1/3/2" {
		t.Fatalf("d1 = %+v desired %+v", d, d.Desired)
	}
	if sl := d.Desired.Slots; len(sl) != 2 || sl[0].Slot != "default" || sl[0].Version != "2.0.0" || sl[1].Slot != "shadow" {
		t.Fatalf("d1 slots = %+v", sl)
	}

	// Unknown device or model: nothing changes for any device.
	for _, c := range []struct {
		ids  []string
		slot DesiredSlot
	}{
		{[]string{"d1", "ghost"}, slot("default", "1.0.0")},
		{[]string{"d1"}, DesiredSlot{Slot: "default", Model: "m", Version: "3.0.0", Digest: "x"}},
	} {
		if _, err := s.Assign(ctx, c.ids, c.slot, t0, build); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Assign(%v, %v) = %v, want ErrNotFound", c.ids, c.slot, err)
		}
	}
	if _, err := s.Assign(ctx, []string{"d1"}, slot("default", "1.0.0"), t0, func(*Desired) error { return errors.New("no key") }); err == nil {
		t.Fatal("Assign ignored a build error")
	}
	d, _ = s.Device(ctx, "d1")
	if d.Generation != 3 || d.Desired.Generation != 3 {
		t.Fatalf("a failed Assign changed d1: %+v", d)
	}

	// Publishing bookkeeping.
	pend, err := s.UnpublishedDesired(ctx)
	if err != nil || len(pend) != 2 || pend[0].DeviceID != "d1" || pend[0].Generation != 3 {
		t.Fatalf("UnpublishedDesired = %+v, %v", pend, err)
	}
	if err := s.MarkPublished(ctx, "d1", 2); err != nil { // an old generation: no effect
		t.Fatal(err)
	}
	if err := s.MarkPublished(ctx, "d2", 8); err != nil {
		t.Fatal(err)
	}
	pend, _ = s.UnpublishedDesired(ctx)
	if len(pend) != 1 || pend[0].DeviceID != "d1" {
		t.Fatalf("UnpublishedDesired after marks = %+v", pend)
	}
	ds, err := s.DesiredState(ctx, "d2")
	if err != nil || !ds.Published || ds.Generation != 8 {
		t.Fatalf("DesiredState(d2) = %+v, %v", ds, err)
	}
	if _, err := s.DesiredState(ctx, "nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DesiredState(nobody) = %v", err)
	}
}

func TestTelemetryDedupe(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	recs := []TelemetryRecord{
		{Seq: 1, Kind: RecordInference, Model: "m", Version: "1.0.0", At: t0, LatencyUS: 120},
		{Seq: 2, Kind: RecordInference, Model: "m", Version: "1.0.0", At: t0, LatencyUS: 90, Error: "timeout"},
		{Seq: 3, Kind: RecordEvent, At: t0, Event: &Event{Kind: "healthy", Slot: "default", At: t0}},
		{Seq: 1 << 63, Kind: RecordOther, At: t0},
	}
	res, err := s.StoreTelemetry(ctx, "dev", "epoch-1", t0, recs)
	if err != nil || res.Inserted != 4 || res.Duplicates != 0 {
		t.Fatalf("first StoreTelemetry = %+v, %v", res, err)
	}
	res, err = s.StoreTelemetry(ctx, "dev", "epoch-1", t0, recs)
	if err != nil || res.Inserted != 0 || res.Duplicates != 4 {
		t.Fatalf("second StoreTelemetry = %+v, %v", res, err)
	}
	// The same seq in a new spool epoch is a new record.
	res, err = s.StoreTelemetry(ctx, "dev", "epoch-2", t0, recs[:1])
	if err != nil || res.Inserted != 1 {
		t.Fatalf("new epoch StoreTelemetry = %+v, %v", res, err)
	}
	d, err := s.Device(ctx, "dev")
	if err != nil || d.Inferences != 3 || d.InferenceErrors != 1 || len(d.LastEvents) != 1 || d.LastEvents[0].Kind != "healthy" {
		t.Fatalf("device = %+v, %v", d, err)
	}
	n, err := s.TelemetryCount(ctx, "dev")
	if err != nil || n != 5 {
		t.Fatalf("TelemetryCount = %d, %v", n, err)
	}
	st, err := s.TelemetryStats(ctx, "dev")
	if err != nil || st.Records != 5 || st.Distinct != 5 || st.Epochs != 2 || st.MinSeq != 1 || st.MaxSeq != 1<<63 || st.Inferences != 3 {
		t.Fatalf("TelemetryStats = %+v, %v", st, err)
	}
}

func TestRetained(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	for _, m := range []RetainedMessage{
		{Topic: "b", Payload: []byte("1"), QoS: 1, Created: t0},
		{Topic: "a", Payload: []byte("2"), QoS: 0, Created: t0},
		{Topic: "b", Payload: []byte("3"), QoS: 1, Created: t0},
	} {
		if err := s.SaveRetained(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteRetained(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	got, err := s.RetainedMessages(ctx)
	if err != nil || len(got) != 1 || got[0].Topic != "b" || string(got[0].Payload) != "3" || got[0].QoS != 1 || !got[0].Created.Equal(t0) {
		t.Fatalf("RetainedMessages = %+v, %v", got, err)
	}
}

// TestReopenKeepsState checks that what one controller run stored is what
// the next run reads.
func TestReopenKeepsState(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	s := open(t, path)
	if err := s.UpsertHello(ctx, Hello{ID: "d", Labels: map[string]string{"a": "b"}, At: t0}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.PutModel(ctx, Model{Name: "m", Version: "1.0.0", Digest: strings.Repeat("a", 64), Size: 1, Manifest: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Assign(ctx, []string{"d"}, DesiredSlot{Slot: "default", Model: "m", Version: "1.0.0", Digest: strings.Repeat("a", 64)}, t0,
		func(d *Desired) error { d.Doc = []byte("doc"); return nil }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, path)
	d, err := s.Device(ctx, "d")
	if err != nil || d.Labels["a"] != "b" || d.Generation != 1 || d.Desired == nil || string(d.Desired.Doc) != "doc" {
		t.Fatalf("after reopen: %+v, %v", d, err)
	}
	if _, err := s.Model(ctx, "m", "1.0.0"); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentWriters checks that parallel write transactions queue
// instead of failing with SQLITE_BUSY.
func TestConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	errs := make(chan error, 8)
	for w := range 8 {
		go func() {
			var err error
			for i := range 20 {
				recs := []TelemetryRecord{{Seq: uint64(i), Kind: RecordInference, At: t0}}
				if _, err = s.StoreTelemetry(ctx, fmt.Sprintf("dev-%d", w%2), fmt.Sprintf("e%d", w), t0, recs); err != nil {
					break
				}
			}
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	var n int64
	for _, id := range []string{"dev-0", "dev-1"} {
		st, err := s.TelemetryStats(ctx, id)
		if err != nil || st.Records != st.Distinct {
			t.Fatalf("TelemetryStats(%s) = %+v, %v", id, st, err)
		}
		n += st.Records
	}
	if n != 160 {
		t.Fatalf("telemetry records = %d, want 160", n)
	}
}
