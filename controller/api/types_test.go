package api

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/access"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

func TestDeviceJSONOfABareDevice(t *testing.T) {
	d, err := deviceJSON(store.Device{ID: "d", LastSeen: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"id":"d","labels":{},"online":false,"lastSeen":"2026-01-02T03:04:05Z","agentVersion":"","os":"","arch":"","health":"unknown",` +
		`"slots":[],"desired":null,"reportedGeneration":0,"spoolDepth":0,"inferences":0,"inferenceErrors":0,"lastEvents":[]}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
}

func TestDeviceJSONWithCorruptState(t *testing.T) {
	d, err := deviceJSON(store.Device{ID: "d", Health: store.HealthOK, State: []byte{0xff, 0xff}})
	if err == nil {
		t.Fatal("corrupt state decoded")
	}
	if d.ID != "d" || d.Health != "ok" || d.Slots == nil || d.LastSeen != nil {
		t.Fatalf("device = %+v", d)
	}
}

// TestDeviceShowsShadowFigures: the shadow comparison a device reports in
// its state (SlotState.shadow) is in GET /v1/devices/{id}, served from a
// real store: candidate, counts, agreement, score differences, p99s and
// since; a slot with no shadow phase has no "shadow" member.
func TestDeviceShowsShadowFigures(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.CreateToken(ctx, store.Token{Name: "ro", Role: "viewer", Hash: access.Hash("secret-ro")}); err != nil {
		t.Fatal(err)
	}
	since := time.Date(2026, 11, 27, 6, 0, 0, 0, time.UTC)
	rs := &pb.ReportedState{Health: pb.Health_HEALTH_OK, Slots: []*pb.SlotState{
		{Slot: "default", Active: &pb.ModelRef{Name: "m", Version: "1.0.0", BundleSha256: "aa"}, Shadow: &pb.ShadowState{
			Candidate: &pb.ModelRef{Name: "m", Version: "1.1.0", BundleSha256: "bb"}, Compared: 200, Agreed: 196, Errors: 1,
			MaxScoreDiff: 0.25, MeanScoreDiff: 0.0125, CandidateP99Us: 1800, ActiveP99Us: 1500, SinceUnixMs: since.UnixMilli()}},
		{Slot: "other", Active: &pb.ModelRef{Name: "n", Version: "2.0.0", BundleSha256: "cc"}},
	}}
	state, err := proto.Marshal(rs)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.UpsertHello(ctx, store.Hello{ID: "dev-1", AgentVersion: "1.0.0", At: since, Report: &store.Report{State: state, Health: store.HealthOK}}); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(New(Options{Devices: st, Tokens: st, Audit: st}))
	defer srv.Close()
	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v1/devices/dev-1", nil)
	req.Header.Set("Authorization", "Bearer secret-ro")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/devices/dev-1: %s", resp.Status)
	}
	var got struct {
		Slots []map[string]json.RawMessage `json:"slots"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if len(got.Slots) != 2 {
		t.Fatalf("%d slots, want 2", len(got.Slots))
	}
	want := `{"candidate":{"name":"m","version":"1.1.0","digest":"bb"},"compared":200,"agreed":196,"errors":1,"agreement":0.98,` +
		`"maxScoreDiff":0.25,"meanScoreDiff":0.0125,"candidateP99Us":1800,"activeP99Us":1500,"since":"2026-11-27T06:00:00Z"}`
	var compact bytes.Buffer
	if err := json.Compact(&compact, got.Slots[0]["shadow"]); err != nil || compact.String() != want {
		t.Fatalf("shadow of slot default (%v):\ngot  %s\nwant %s", err, compact.String(), want)
	}
	if s, ok := got.Slots[1]["shadow"]; ok {
		t.Fatalf("slot other had no shadow phase but shows %s", s)
	}

	// Before the first comparison the agreement is null, not 0%.
	d, err := deviceJSON(store.Device{ID: "d", State: mustMarshal(t, &pb.ReportedState{Slots: []*pb.SlotState{{Slot: "default", Shadow: &pb.ShadowState{}}}})})
	if err != nil {
		t.Fatal(err)
	}
	if sh := d.Slots[0].Shadow; sh == nil || sh.Agreement != nil || sh.Since != nil {
		t.Fatalf("an empty comparison shows %+v", sh)
	}
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
