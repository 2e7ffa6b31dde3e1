package agent_test

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/agent/update"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// regenCompat rewrites testdata/compat-0.1.0 with this code. Do it only
// when that directory is meant to hold a new release's files: the point
// of the test is that files written by an older agent stay readable.
var regenCompat = flag.Bool("regen-compat", false, "rewrite testdata/compat-0.1.0 from the current code")

const compatDir = "testdata/compat-0.1.0"

const compatDigest = "4f1c2ab8a3e7fcbf3b8f1d2c6a0d9e8b7c6f5a4e3d2c1b0a9f8e7d6c5b4a3f2e"

// TestDataFilesReadAcrossVersions opens the data directory files of agent
// 0.1.0 (committed in testdata, written by that code) with this code: the
// spool, state.json, desired.pb and the update record. After an agent
// self-update the new version reads them, and after the watchdog undoes
// one, the previous version reads what the new one wrote; the second half
// checks that direction with a state.json and a record of a future layout.
func TestDataFilesReadAcrossVersions(t *testing.T) {
	if *regenCompat {
		writeCompatFiles(t)
	}
	ctx := context.Background()

	// The spool: a copy, since opening may migrate it.
	dir := t.TempDir()
	raw, err := os.ReadFile(filepath.Join(compatDir, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(dir, "spool.db")
	if err := os.WriteFile(db, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	sp, err := spool.OpenSQLite(ctx, db, spool.DefaultMaxRecords)
	if err != nil {
		t.Fatalf("spool of 0.1.0: %v", err)
	}
	defer sp.Close()
	st, err := sp.Stats(ctx)
	if err != nil || st.Depth != 3 {
		t.Fatalf("spool of 0.1.0: depth %d, %v; want its 3 records", st.Depth, err)
	}
	recs, err := sp.Read(ctx, 0, ^uint64(0)>>1, 10)
	if err != nil || len(recs) != 3 || recs[0].GetInference().GetModel() != "grid-anomaly" {
		t.Fatalf("spool of 0.1.0: read %v, %v", recs, err)
	}

	b, err := os.ReadFile(filepath.Join(compatDir, deploy.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	state, err := deploy.ParseState(b)
	if err != nil {
		t.Fatalf("state.json of 0.1.0: %v", err)
	}
	if a := state.Slots["default"].Active; a == nil || a.Version != "1.0.0" || a.Digest != compatDigest {
		t.Fatalf("state.json of 0.1.0: default slot %+v", state.Slots["default"])
	}

	b, err = os.ReadFile(filepath.Join(compatDir, deploy.DesiredFile))
	if err != nil {
		t.Fatal(err)
	}
	var sd pb.SignedDesiredState
	if err := proto.Unmarshal(b, &sd); err != nil {
		t.Fatal(err)
	}
	ds, err := deploy.DecodeDesired(&sd)
	if err != nil || ds.GetGeneration() != 7 || ds.GetAgentRelease().GetVersion() != "0.2.0" {
		t.Fatalf("desired.pb of 0.1.0: %v, %v", ds, err)
	}

	rec, err := update.ReadRecord(compatDir)
	if err != nil || rec == nil || rec.State != update.StateHealthy || rec.To != "0.1.0" {
		t.Fatalf("agent-update.json of 0.1.0: %+v, %v", rec, err)
	}

	// Files of a newer agent, read by this one after a rollback.
	var future map[string]any
	if err := json.Unmarshal(b2(t, filepath.Join(compatDir, deploy.StateFile)), &future); err != nil {
		t.Fatal(err)
	}
	future["version"] = 2
	future["compat"] = 1
	future["telemetry_cursor"] = map[string]any{"seq": 12}
	future["slots"].(map[string]any)["default"].(map[string]any)["pinned"] = true
	nb, _ := json.Marshal(future)
	if _, err := deploy.ParseState(nb); err != nil {
		t.Fatalf("state.json of a newer, compatible layout refused: %v", err)
	}
	future["compat"] = 2
	nb, _ = json.Marshal(future)
	if _, err := deploy.ParseState(nb); err == nil || !strings.Contains(err.Error(), "newer agent") {
		t.Fatalf("state.json needing a newer reader: err %v", err)
	}
	if _, err := update.ParseRecord([]byte(`{"layout":2,"compat":1,"state":"restored","from":"0.1.0","to":"0.2.0","exe":"/x","reason":"r","attempt_log":[1,2]}`)); err != nil {
		t.Fatalf("update record of a newer layout refused: %v", err)
	}
}

func b2(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeCompatFiles(t *testing.T) {
	ctx := context.Background()
	if err := os.MkdirAll(compatDir, 0o755); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(compatDir, "spool.db")
	for _, suffix := range []string{"", "-wal", "-shm"} {
		os.Remove(db + suffix)
	}
	sp, err := spool.OpenSQLite(ctx, db, spool.DefaultMaxRecords)
	if err != nil {
		t.Fatal(err)
	}
	var recs []*pb.TelemetryRecord
	for i := range 3 {
		recs = append(recs, &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
			Model: "grid-anomaly", Version: "1.0.0", AtUnixMs: 1764200000000 + int64(i), LatencyUs: 150}}})
	}
	if err := sp.Append(ctx, recs); err != nil {
		t.Fatal(err)
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}
	st := deploy.State{Version: 1, Slots: map[string]*deploy.SlotRecord{"default": {
		Active: &deploy.Ref{Name: "grid-anomaly", Version: "1.0.0", Digest: compatDigest}, SinceUnixMs: 1764200000000, Generation: 7}}}
	sb, _ := json.MarshalIndent(st, "", "  ")
	if err := os.WriteFile(filepath.Join(compatDir, deploy.StateFile), append(sb, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	inner, _ := proto.Marshal(&pb.DesiredState{DeviceId: "compat-1", Generation: 7, IssuedAtUnixMs: 1764200000000,
		Slots:        []*pb.SlotAssignment{{Slot: "default", Model: &pb.ModelRef{Name: "grid-anomaly", Version: "1.0.0", BundleSha256: compatDigest}, Url: "/v1/artifacts/" + compatDigest, Size: 1000}},
		AgentRelease: &pb.AgentRelease{Version: "0.2.0", Url: "/v1/artifacts/agent-releases/0.2.0", RolloutId: "agent-0.2.0"}})
	sd, _ := proto.Marshal(&pb.SignedDesiredState{Desired: inner})
	if err := os.WriteFile(filepath.Join(compatDir, deploy.DesiredFile), sd, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := update.WriteRecord(compatDir, &update.Record{State: update.StateHealthy, From: "0.0.9", To: "0.1.0", Exe: "/usr/local/bin/fleet-agent",
		SwappedUnixMs: 1764200000000, DeadlineUnixMs: 1764200060000, ProbationUnixMs: 1764200120000}); err != nil {
		t.Fatal(err)
	}
}
