package controller

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/api"
	"github.com/edgefleet/edgefleet/controller/broker"
	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// harness is one controller running in the test process.
type harness struct {
	t    *testing.T
	c    *Controller
	dir  string
	base string // http://host:port
	mqtt string // tcp://host:port
	stop func()
}

// start runs a controller on free ports with its data in dir.
func start(t *testing.T, dir string, mutate func(*Config)) *harness {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DataDir = dir
	cfg.MQTTListen = "127.0.0.1:0"
	cfg.HTTPListen = "127.0.0.1:0"
	if mutate != nil {
		mutate(&cfg)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	c, err := New(context.Background(), cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("controller stopped before ready: %v", err)
	case <-time.After(15 * time.Second):
		cancel()
		t.Fatal("controller not ready within 15s")
	}
	h := &harness{t: t, c: c, dir: dir, base: "http://" + c.HTTPAddr(), mqtt: c.brokerURL}
	var once sync.Once
	h.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("controller Run: %v", err)
				}
			case <-time.After(15 * time.Second):
				t.Error("controller did not stop within 15s")
			}
		})
	}
	t.Cleanup(h.stop)
	return h
}

// testWriter sends the controller's log to the test's log, shown on failure.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (h *harness) do(method, path string, body []byte, hdr map[string]string) (*http.Response, []byte) {
	h.t.Helper()
	req, err := http.NewRequest(method, h.base+path, bytes.NewReader(body))
	if err != nil {
		h.t.Fatal(err)
	}
	// Requests carry the controller's first admin token unless the test
	// sets Authorization itself ("" for none).
	if _, ok := hdr["Authorization"]; !ok {
		req.Header.Set("Authorization", "Bearer "+h.adminToken())
	}
	for k, v := range hdr {
		if v != "" {
			req.Header.Set(k, v)
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		h.t.Fatal(err)
	}
	return resp, b
}

// adminToken returns the token the controller wrote to its data dir on
// first start.
func (h *harness) adminToken() string {
	h.t.Helper()
	b, err := os.ReadFile(h.c.AdminTokenFile())
	if err != nil {
		h.t.Fatalf("admin token: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// call does a request, checks the status, and decodes a JSON answer into
// out (when not nil).
func (h *harness) call(method, path string, body []byte, wantStatus int, out any) []byte {
	h.t.Helper()
	resp, b := h.do(method, path, body, nil)
	if resp.StatusCode != wantStatus {
		h.t.Fatalf("%s %s: status %d, want %d; body %s", method, path, resp.StatusCode, wantStatus, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			h.t.Fatalf("%s %s: decode %s: %v", method, path, b, err)
		}
	}
	return b
}

// apiError calls and checks that the error body names want.
func (h *harness) apiError(method, path string, body []byte, wantStatus int, want string) {
	h.t.Helper()
	var e api.Error
	h.call(method, path, body, wantStatus, &e)
	if !strings.Contains(e.Error, want) {
		h.t.Fatalf("%s %s: error %q, want it to contain %q", method, path, e.Error, want)
	}
}

func (h *harness) metric(name string) string {
	h.t.Helper()
	_, b := h.do("GET", "/metrics", nil, nil)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		return "0"
	}
	return string(m[1])
}

// tryDevice returns the device, or false while the controller does not know it.
func (h *harness) tryDevice(id string) (api.Device, bool) {
	h.t.Helper()
	resp, b := h.do("GET", "/v1/devices/"+id, nil, nil)
	if resp.StatusCode == http.StatusNotFound {
		return api.Device{}, false
	}
	var d api.Device
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &d) != nil {
		h.t.Fatalf("GET /v1/devices/%s: %d %s", id, resp.StatusCode, b)
	}
	return d, true
}

func (h *harness) device(id string) api.Device {
	h.t.Helper()
	var d api.Device
	h.call("GET", "/v1/devices/"+id, nil, http.StatusOK, &d)
	return d
}

func makeBundle(t *testing.T, name, version string, module []byte) *bundle.Bundle {
	t.Helper()
	spec := []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 3}}}
	b, err := bundle.New(bundle.Manifest{ABI: 1, Name: name, Version: version, Inputs: spec, Outputs: spec}, module)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func encode(t *testing.T, b *bundle.Bundle) []byte {
	t.Helper()
	data, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func desiredOf(t *testing.T, env *pb.Envelope) *pb.DesiredState {
	t.Helper()
	signed := env.GetDesired()
	if signed == nil {
		t.Fatalf("not a desired state: %v", env)
	}
	var ds pb.DesiredState
	if err := proto.Unmarshal(signed.GetDesired(), &ds); err != nil {
		t.Fatal(err)
	}
	return &ds
}

func ref(name, version, digest string) *pb.ModelRef {
	return &pb.ModelRef{Name: name, Version: version, BundleSha256: digest}
}

func TestInventoryThroughAPI(t *testing.T) {
	h := start(t, t.TempDir(), nil)
	dev := testdevice.Connect(t, h.mqtt, "pos-1")
	since := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	dev.Send(wire.KindPresence, &pb.Presence{Online: true})
	dev.Send(wire.KindHello, &pb.Hello{
		Labels: map[string]string{"region": "eu", "hw": "jetson"}, AgentVersion: "0.1.0", Os: "linux", Arch: "arm64",
		State: &pb.ReportedState{Health: pb.Health_HEALTH_OK, DesiredGeneration: 0, SpoolDepth: 3},
	})
	dev.Send(wire.KindState, &pb.ReportedState{
		Health: pb.Health_HEALTH_DEGRADED, DesiredGeneration: 0, SpoolDepth: 12,
		Slots: []*pb.SlotState{{
			Slot: "default", Active: ref("grid", "1.0.0", "aa"), Previous: ref("grid", "0.9.0", "bb"),
			ActiveSinceUnixMs: since.UnixMilli(), LastError: "slow",
		}},
	})
	dev.Send(wire.KindEvents, &pb.Event{Kind: pb.EventKind_EVENT_KIND_ROLLED_BACK, Slot: "default", Model: ref("grid", "1.1.0", "cc"), Detail: "golden test failed", AtUnixMs: since.UnixMilli()})
	dev.Send(wire.KindEvents, &pb.Event{Kind: pb.EventKind_EVENT_KIND_ACTIVATED, Slot: "default", Model: ref("grid", "1.0.0", "aa"), AtUnixMs: since.Add(time.Minute).UnixMilli()})

	testdevice.Eventually(t, func() (bool, string) {
		d, ok := h.tryDevice("pos-1")
		return ok && d.SpoolDepth == 12 && len(d.LastEvents) == 2, fmt.Sprintf("%+v", d)
	})
	d := h.device("pos-1")
	sinceStr := since.Format(time.RFC3339)
	want := api.Device{
		ID: "pos-1", Labels: map[string]string{"region": "eu", "hw": "jetson"}, Online: true, LastSeen: d.LastSeen,
		AgentVersion: "0.1.0", OS: "linux", Arch: "arm64", Health: "degraded",
		Slots: []api.Slot{{
			Slot: "default", Active: &api.ModelRef{Name: "grid", Version: "1.0.0", Digest: "aa"},
			Previous: &api.ModelRef{Name: "grid", Version: "0.9.0", Digest: "bb"}, ActiveSince: &sinceStr, LastError: "slow",
		}},
		SpoolDepth: 12,
		LastEvents: []api.Event{
			{Kind: "activated", Slot: "default", Name: "grid", Version: "1.0.0", At: since.Add(time.Minute).Format(time.RFC3339)},
			{Kind: "rolled-back", Slot: "default", Name: "grid", Version: "1.1.0", Detail: "golden test failed", At: sinceStr},
		},
	}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("device\n got %+v\nwant %+v", d, want)
	}
	if d.LastSeen == nil {
		t.Fatal("lastSeen is null")
	}
	if seen, err := time.Parse(time.RFC3339, *d.LastSeen); err != nil || time.Since(seen) > time.Minute {
		t.Fatalf("lastSeen = %q, %v", *d.LastSeen, err)
	}
	// The raw JSON uses the contract's names, with null for absent values.
	raw := h.call("GET", "/v1/devices/pos-1", nil, http.StatusOK, nil)
	for _, field := range []string{`"lastSeen"`, `"agentVersion"`, `"reportedGeneration": 0`, `"spoolDepth": 12`, `"inferences": 0`,
		`"inferenceErrors": 0`, `"lastEvents"`, `"desired": null`, `"pending": null`, `"activeSince": "` + sinceStr} {
		if !bytes.Contains(raw, []byte(field)) {
			t.Errorf("device JSON lacks %s:\n%s", field, raw)
		}
	}

	// The last will says offline.
	dev.Send(wire.KindPresence, &pb.Presence{Online: false})
	testdevice.Eventually(t, func() (bool, string) { return !h.device("pos-1").Online, "still online" })

	// A second device, and selectors over both.
	other := testdevice.Connect(t, h.mqtt, "pos-0")
	other.Send(wire.KindHello, &pb.Hello{Labels: map[string]string{"region": "us"}})
	testdevice.Eventually(t, func() (bool, string) {
		var l api.DeviceList
		h.call("GET", "/v1/devices", nil, http.StatusOK, &l)
		return len(l.Devices) == 2, fmt.Sprintf("%d devices", len(l.Devices))
	})
	for sel, want := range map[string][]string{
		"":                         {"pos-0", "pos-1"},
		"region=eu":                {"pos-1"},
		"region!=eu":               {"pos-0"},
		"hw":                       {"pos-1"},
		"!hw":                      {"pos-0"},
		"region in (eu,us),hw":     {"pos-1"},
		"region notin (eu)":        {"pos-0"},
		"region=eu,hw notin (rpi)": {"pos-1"},
		"region=mars":              {},
	} {
		var l api.DeviceList
		h.call("GET", "/v1/devices?selector="+url.QueryEscape(sel), nil, http.StatusOK, &l)
		got := []string{}
		for _, d := range l.Devices {
			got = append(got, d.ID)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("selector %q: devices %v, want %v", sel, got, want)
		}
	}
	h.apiError("GET", "/v1/devices?selector="+url.QueryEscape("region in eu"), nil, http.StatusBadRequest, "expected '('")
	h.apiError("GET", "/v1/devices/nobody", nil, http.StatusNotFound, `device "nobody" is not known`)
	h.apiError("GET", "/v1/devices/bad%20id", nil, http.StatusBadRequest, "contains")
	h.apiError("GET", "/v1/nothing", nil, http.StatusNotFound, "no such endpoint")
	if got := h.metric(`edgefleet_controller_mqtt_messages_received_total{kind="events"}`); got != "2" {
		t.Errorf("events received = %s, want 2", got)
	}
}

func TestTelemetryStoredOnceAndAcked(t *testing.T) {
	h := start(t, t.TempDir(), nil)
	dev := testdevice.Connect(t, h.mqtt, "grid-7")
	acks := dev.Subscribe(wire.KindAck)
	inf := func(seq uint64, errMsg string) *pb.TelemetryRecord {
		return &pb.TelemetryRecord{Seq: seq, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{
			Model: "grid", Version: "1.0.0", AtUnixMs: time.Now().UnixMilli(), LatencyUs: 250, Error: errMsg}}}
	}
	batch := &pb.TelemetryBatch{SpoolEpoch: "epoch-a", Records: []*pb.TelemetryRecord{
		inf(3, ""), inf(1, ""), inf(2, "timeout"), inf(5, ""),
		{Seq: 7, Body: &pb.TelemetryRecord_Event{Event: &pb.Event{Kind: pb.EventKind_EVENT_KIND_HEALTHY, Slot: "default"}}},
		inf(8, ""),
	}}
	wantRanges := []*pb.SeqRange{{First: 1, Last: 3}, {First: 5, Last: 5}, {First: 7, Last: 8}}
	for i := range 2 {
		dev.Send(wire.KindTelemetry, batch)
		ack := dev.Next(acks).GetAck()
		if ack.GetSpoolEpoch() != "epoch-a" || len(ack.GetStored()) != len(wantRanges) {
			t.Fatalf("ack %d = %v", i, ack)
		}
		for j, r := range ack.GetStored() {
			if !proto.Equal(r, wantRanges[j]) {
				t.Fatalf("ack %d range %d = %v, want %v", i, j, r, wantRanges[j])
			}
		}
	}
	d := h.device("grid-7")
	if d.Inferences != 5 || d.InferenceErrors != 1 || len(d.LastEvents) != 1 || d.LastEvents[0].Kind != "healthy" {
		t.Fatalf("device after two identical batches = %+v", d)
	}
	n, err := h.c.store.TelemetryCount(context.Background(), "grid-7")
	if err != nil || n != 6 {
		t.Fatalf("stored records = %d, %v; want 6", n, err)
	}
	if s, dup := h.metric("edgefleet_controller_telemetry_records_stored_total"), h.metric("edgefleet_controller_telemetry_duplicates_total"); s != "6" || dup != "6" {
		t.Fatalf("metrics stored=%s duplicates=%s, want 6 and 6", s, dup)
	}
	// No retained ack lingers for a device that reconnects.
	late := testdevice.Connect(t, h.mqtt, "grid-7-late")
	lateAcks := late.Subscribe(wire.KindAck)
	_ = lateAcks
	select {
	case env := <-lateAcks:
		t.Fatalf("unexpected ack %v", env)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestMalformedPayloads sends every kind of bad payload on every
// subscribed topic; the controller counts and drops each, and goes on
// serving. It runs against an external broker, the other deployment.
func TestMalformedPayloads(t *testing.T) {
	b, err := broker.New(broker.Options{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	bctx, stopBroker := context.WithCancel(context.Background())
	bdone := make(chan error, 1)
	go func() { bdone <- b.Run(bctx) }()
	t.Cleanup(func() { stopBroker(); <-bdone })
	if err := b.Open(); err != nil {
		t.Fatal(err)
	}
	h := start(t, t.TempDir(), func(c *Config) { c.Broker = "tcp://" + b.Addr().String() })
	if h.c.broker != nil {
		t.Fatal("controller embedded a broker although --broker was given")
	}

	dev := testdevice.Connect(t, h.mqtt, "evil")
	hello, err := wire.Seal("evil", time.Now(), &pb.Hello{})
	if err != nil {
		t.Fatal(err)
	}
	otherDevice, err := wire.Seal("someone-else", time.Now(), &pb.Presence{Online: true})
	if err != nil {
		t.Fatal(err)
	}
	oldVersion, _ := proto.Marshal(&pb.Envelope{DeviceId: "evil", Body: &pb.Envelope_Hello{Hello: &pb.Hello{}}})
	payloads := map[string][]byte{
		"garbage":      {0xff, 0xfe, 0x01, 0x02},
		"oversize":     bytes.Repeat([]byte{0}, wire.MaxPayload+1),
		"other device": otherDevice,
		"version 0":    oldVersion,
	}
	for _, k := range []wire.Kind{wire.KindHello, wire.KindState, wire.KindPresence, wire.KindEvents, wire.KindTelemetry} {
		for name, p := range payloads {
			t.Logf("sending %s on %s", name, k)
			dev.SendRaw(wire.Topic("evil", k), p, false)
		}
		if k != wire.KindHello { // a hello on the wrong topic
			dev.SendRaw(wire.Topic("evil", k), hello, false)
		}
		// A cleared retained topic is not malformed: it is ignored.
		dev.SendRaw(wire.Topic("evil", k), nil, true)
	}
	for _, k := range []wire.Kind{wire.KindHello, wire.KindState, wire.KindPresence, wire.KindEvents, wire.KindTelemetry} {
		want := len(payloads)
		if k != wire.KindHello {
			want++
		}
		name := fmt.Sprintf(`edgefleet_controller_mqtt_messages_malformed_total{kind="%s"}`, k)
		testdevice.Eventually(t, func() (bool, string) {
			got := h.metric(name)
			return got == fmt.Sprint(want), fmt.Sprintf("%s = %s, want %d", name, got, want)
		})
	}
	// Still serving: a good hello goes through, nothing bad was stored.
	dev.Send(wire.KindHello, &pb.Hello{AgentVersion: "ok"})
	testdevice.Eventually(t, func() (bool, string) {
		resp, b := h.do("GET", "/v1/devices/evil", nil, nil)
		return resp.StatusCode == http.StatusOK && strings.Contains(string(b), `"agentVersion": "ok"`), string(b)
	})
	h.apiError("GET", "/v1/devices/someone-else", nil, http.StatusNotFound, "not known")
	h.call("GET", "/healthz", nil, http.StatusOK, nil)
}

func TestModelsAssignmentsAndArtifacts(t *testing.T) {
	h := start(t, t.TempDir(), nil)
	for _, id := range []string{"eu-1", "eu-2", "us-1"} {
		region := id[:2]
		testdevice.Connect(t, h.mqtt, id).Send(wire.KindHello, &pb.Hello{Labels: map[string]string{"region": region}})
	}
	testdevice.Eventually(t, func() (bool, string) {
		var l api.DeviceList
		h.call("GET", "/v1/devices", nil, http.StatusOK, &l)
		return len(l.Devices) == 3, fmt.Sprintf("%d devices", len(l.Devices))
	})

	// Upload.
	module := bytes.Repeat([]byte("\x00asm-not-really"), 100)
	b1 := makeBundle(t, "grid-anomaly", "1.0.0", module)
	data1 := encode(t, b1)
	var m api.Model
	h.call("POST", "/v1/models", data1, http.StatusCreated, &m)
	if m.Name != "grid-anomaly" || m.Version != "1.0.0" || m.Digest != b1.Digest || m.Size != int64(len(data1)) {
		t.Fatalf("pushed model = %+v", m)
	}
	h.call("POST", "/v1/models", data1, http.StatusOK, &m)
	if m.Digest != b1.Digest {
		t.Fatalf("re-pushed model = %+v", m)
	}
	if stored, err := os.ReadFile(filepath.Join(h.dir, "artifacts", "sha256", b1.Digest)); err != nil || !bytes.Equal(stored, data1) {
		t.Fatalf("artifact file: %v", err)
	}
	h.apiError("POST", "/v1/models", encode(t, makeBundle(t, "grid-anomaly", "1.0.0", []byte("other module"))), http.StatusConflict, "already stored with digest "+b1.Digest)
	h.apiError("POST", "/v1/models", []byte("not a tar"), http.StatusBadRequest, "invalid bundle")
	h.apiError("POST", "/v1/models", nil, http.StatusBadRequest, "empty body")
	b2 := makeBundle(t, "grid-anomaly", "1.1.0", []byte("v2 module"))
	h.call("POST", "/v1/models", encode(t, b2), http.StatusCreated, nil)
	var ml api.ModelList
	h.call("GET", "/v1/models", nil, http.StatusOK, &ml)
	if len(ml.Models) != 2 || ml.Models[0].Version != "1.0.0" || ml.Models[1].Digest != b2.Digest || ml.Models[0].CreatedAt == "" {
		t.Fatalf("models = %+v", ml)
	}

	// Assign to region=eu; a device subscribing afterwards gets the retained
	// desired state.
	assign := func(body string, wantStatus int) api.AssignmentResponse {
		t.Helper()
		var r api.AssignmentResponse
		h.call("POST", "/v1/assignments", []byte(body), wantStatus, &r)
		return r
	}
	r := assign(`{"model":"grid-anomaly","version":"1.0.0","selector":"region=eu"}`, http.StatusOK)
	if !reflect.DeepEqual(r.Devices, []string{"eu-1", "eu-2"}) || len(r.Unpublished) != 0 {
		t.Fatalf("assignment = %+v", r)
	}
	eu1 := testdevice.Connect(t, h.mqtt, "eu-1")
	desired := eu1.Subscribe(wire.KindDesired)
	ds := desiredOf(t, eu1.Next(desired))
	if ds.GetDeviceId() != "eu-1" || ds.GetGeneration() != 1 || len(ds.GetSlots()) != 1 || ds.GetIssuedAtUnixMs() == 0 {
		t.Fatalf("desired state = %v", ds)
	}
	slot := ds.GetSlots()[0]
	if slot.GetSlot() != "default" || !proto.Equal(slot.GetModel(), ref("grid-anomaly", "1.0.0", b1.Digest)) ||
		slot.GetUrl() != "/v1/artifacts/"+b1.Digest || slot.GetSize() != int64(len(data1)) {
		t.Fatalf("slot = %v", slot)
	}

	// A second assignment raises the generation and keeps the other slot.
	assign(`{"model":"grid-anomaly","version":"1.1.0","slot":"shadow","selector":"region=eu"}`, http.StatusOK)
	ds = desiredOf(t, eu1.Next(desired))
	if ds.GetGeneration() != 2 || len(ds.GetSlots()) != 2 || ds.GetSlots()[1].GetSlot() != "shadow" || ds.GetSlots()[1].GetModel().GetVersion() != "1.1.0" {
		t.Fatalf("second desired state = %v", ds)
	}
	d := h.device("eu-1")
	if d.Desired == nil || d.Desired.Generation != 2 || len(d.Desired.Slots) != 2 || d.Desired.Slots[0].Digest != b1.Digest {
		t.Fatalf("device desired = %+v", d.Desired)
	}
	if us := h.device("us-1"); us.Desired != nil {
		t.Fatalf("us-1 got a desired state: %+v", us.Desired)
	}
	// Empty selector: every device.
	if r := assign(`{"model":"grid-anomaly","version":"1.0.0"}`, http.StatusOK); len(r.Devices) != 3 {
		t.Fatalf("assign to all = %+v", r)
	}
	if got := h.metric("edgefleet_controller_desired_published_total"); got != "7" {
		t.Fatalf("desired published = %s, want 7", got)
	}
	testdevice.Eventually(t, func() (bool, string) {
		pend, err := h.c.store.UnpublishedDesired(context.Background())
		return err == nil && len(pend) == 0, fmt.Sprintf("unpublished %v %v", pend, err)
	})

	for _, c := range []struct {
		body   string
		status int
		want   string
	}{
		{`{"model":"grid-anomaly","version":"9.9.9"}`, http.StatusNotFound, "grid-anomaly@9.9.9 is not stored"},
		{`{"model":"grid-anomaly","version":"1.0.0","selector":"region="}`, http.StatusBadRequest, `no device matches selector "region="`},
		{`{"model":"grid-anomaly","version":"1.0.0","selector":"region=mars"}`, http.StatusBadRequest, "no device matches"},
		{`{"model":"grid-anomaly","version":"1.0.0","selector":"region in (eu"}`, http.StatusBadRequest, "expected ',' or ')'"},
		{`{"model":"grid-anomaly","version":"1.0.0","slot":"Bad Slot"}`, http.StatusBadRequest, `slot "Bad Slot"`},
		{`{"version":"1.0.0"}`, http.StatusBadRequest, `"model" and "version" are required`},
		{`{"model":`, http.StatusBadRequest, "want JSON like"},
	} {
		h.apiError("POST", "/v1/assignments", []byte(c.body), c.status, c.want)
	}

	// Artifact download, whole and by range.
	resp, body := h.do("GET", "/v1/artifacts/"+b1.Digest, nil, nil)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data1) || resp.Header.Get("ETag") != `"`+b1.Digest+`"` {
		t.Fatalf("artifact: %d, %d bytes, ETag %q", resp.StatusCode, len(body), resp.Header.Get("ETag"))
	}
	resp, body = h.do("GET", "/v1/artifacts/"+b1.Digest, nil, map[string]string{"Range": "bytes=1000-1099"})
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, data1[1000:1100]) ||
		resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 1000-1099/%d", len(data1)) {
		t.Fatalf("range: %d, %d bytes, Content-Range %q", resp.StatusCode, len(body), resp.Header.Get("Content-Range"))
	}
	resp, body = h.do("GET", "/v1/artifacts/"+b1.Digest, nil, map[string]string{"Range": fmt.Sprintf("bytes=%d-", len(data1)-10)})
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, data1[len(data1)-10:]) {
		t.Fatalf("resume from the end: %d, %d bytes", resp.StatusCode, len(body))
	}
	resp, _ = h.do("GET", "/v1/artifacts/"+b1.Digest, nil, map[string]string{"If-None-Match": `"` + b1.Digest + `"`})
	if resp.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match: %d", resp.StatusCode)
	}
	h.apiError("GET", "/v1/artifacts/"+strings.Repeat("0", 64), nil, http.StatusNotFound, "is not stored")
	h.apiError("GET", "/v1/artifacts/..%2f..%2fcontroller.db", nil, http.StatusBadRequest, "not a sha256 digest")
}

// TestRestartKeepsState runs a controller, stops it, and runs another on
// the same data directory.
func TestRestartKeepsState(t *testing.T) {
	dir := t.TempDir()
	h := start(t, dir, nil)
	dev := testdevice.Connect(t, h.mqtt, "cab-3")
	dev.Send(wire.KindHello, &pb.Hello{Labels: map[string]string{"site": "a"}, AgentVersion: "0.1.0"})
	testdevice.Eventually(t, func() (bool, string) {
		_, ok := h.tryDevice("cab-3")
		return ok, "device not known yet"
	})
	b := makeBundle(t, "clinic", "2.0.0", []byte("module"))
	h.call("POST", "/v1/models", encode(t, b), http.StatusCreated, nil)
	h.call("POST", "/v1/assignments", []byte(`{"model":"clinic","version":"2.0.0"}`), http.StatusOK, nil)
	h.call("POST", "/v1/assignments", []byte(`{"model":"clinic","version":"2.0.0"}`), http.StatusOK, nil)
	h.stop()

	h = start(t, dir, nil)
	d := h.device("cab-3")
	if d.Labels["site"] != "a" || d.AgentVersion != "0.1.0" || d.Desired == nil || d.Desired.Generation != 2 {
		t.Fatalf("device after restart = %+v", d)
	}
	if d.Online {
		t.Fatal("device online after a restart of the embedded broker it was connected to")
	}
	var ml api.ModelList
	h.call("GET", "/v1/models", nil, http.StatusOK, &ml)
	if len(ml.Models) != 1 || ml.Models[0].Digest != b.Digest {
		t.Fatalf("models after restart = %+v", ml)
	}

	// The retained desired state survived in the embedded broker.
	dev = testdevice.Connect(t, h.mqtt, "cab-3")
	desired := dev.Subscribe(wire.KindDesired)
	if ds := desiredOf(t, dev.Next(desired)); ds.GetGeneration() != 2 {
		t.Fatalf("retained desired state after restart = %v", ds)
	}
	// The generation goes on from where it was.
	h.call("POST", "/v1/assignments", []byte(`{"model":"clinic","version":"2.0.0"}`), http.StatusOK, nil)
	if ds := desiredOf(t, dev.Next(desired)); ds.GetGeneration() != 3 {
		t.Fatalf("desired state after restart = %v", ds)
	}

	// A broker that lost the retained message: the device's hello reports
	// an older generation and the controller publishes it again.
	dev.SendRaw(wire.Topic("cab-3", wire.KindDesired), nil, true)
	dev.Send(wire.KindHello, &pb.Hello{Labels: map[string]string{"site": "a"}, State: &pb.ReportedState{DesiredGeneration: 1}})
	if ds := desiredOf(t, dev.Next(desired)); ds.GetGeneration() != 3 {
		t.Fatalf("re-published desired state = %v", ds)
	}
	// A device that is up to date gets nothing.
	dev.Send(wire.KindHello, &pb.Hello{Labels: map[string]string{"site": "a"}, State: &pb.ReportedState{DesiredGeneration: 3}})
	select {
	case env := <-desired:
		t.Fatalf("desired state re-published to an up-to-date device: %v", desiredOf(t, env))
	case <-time.After(300 * time.Millisecond):
	}
}

// TestDesiredStateRepublishedAfterBrokerOutage assigns while an external
// broker is down: the desired state is committed, reported unpublished,
// and published once the controller reconnects.
func TestDesiredStateRepublishedAfterBrokerOutage(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	runBroker := func() func() {
		b, err := broker.New(broker.Options{Listen: addr})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- b.Run(ctx) }()
		if err := b.Open(); err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		stop := func() { once.Do(func() { cancel(); <-done }) }
		t.Cleanup(stop)
		return stop
	}
	stopBroker := runBroker()
	h := start(t, t.TempDir(), func(c *Config) {
		c.Broker = "tcp://" + addr
		c.publishTimeout = 500 * time.Millisecond
		c.connectTimeout = time.Second
	})
	testdevice.Connect(t, h.mqtt, "van-1").Send(wire.KindHello, &pb.Hello{})
	testdevice.Eventually(t, func() (bool, string) {
		_, ok := h.tryDevice("van-1")
		return ok, "device not known yet"
	})
	b := makeBundle(t, "route", "1.0.0", []byte("module"))
	h.call("POST", "/v1/models", encode(t, b), http.StatusCreated, nil)

	stopBroker()
	testdevice.Eventually(t, func() (bool, string) { return !h.c.link.Connected(), "link still connected" })
	var r api.AssignmentResponse
	h.call("POST", "/v1/assignments", []byte(`{"model":"route","version":"1.0.0"}`), http.StatusOK, &r)
	if !reflect.DeepEqual(r.Devices, []string{"van-1"}) || !reflect.DeepEqual(r.Unpublished, []string{"van-1"}) {
		t.Fatalf("assignment during the outage = %+v", r)
	}
	if d := h.device("van-1"); d.Desired == nil || d.Desired.Generation != 1 {
		t.Fatalf("desired state not committed: %+v", d.Desired)
	}

	runBroker()
	testdevice.Eventually(t, func() (bool, string) {
		pend, err := h.c.store.UnpublishedDesired(context.Background())
		return err == nil && len(pend) == 0, fmt.Sprintf("unpublished: %d, %v", len(pend), err)
	})
	dev := testdevice.Connect(t, h.mqtt, "van-1")
	if ds := desiredOf(t, dev.Next(dev.Subscribe(wire.KindDesired))); ds.GetGeneration() != 1 {
		t.Fatalf("desired state after the outage = %v", ds)
	}
}

func TestPublicURLMakesAbsoluteArtifactURLs(t *testing.T) {
	h := start(t, t.TempDir(), func(c *Config) { c.PublicURL = "https://fleet.example/" })
	dev := testdevice.Connect(t, h.mqtt, "d")
	dev.Send(wire.KindHello, &pb.Hello{})
	testdevice.Eventually(t, func() (bool, string) {
		_, ok := h.tryDevice("d")
		return ok, "device not known yet"
	})
	b := makeBundle(t, "m", "1.0.0", []byte("x"))
	h.call("POST", "/v1/models", encode(t, b), http.StatusCreated, nil)
	desired := dev.Subscribe(wire.KindDesired)
	h.call("POST", "/v1/assignments", []byte(`{"model":"m","version":"1.0.0"}`), http.StatusOK, nil)
	if url := desiredOf(t, dev.Next(desired)).GetSlots()[0].GetUrl(); url != "https://fleet.example/v1/artifacts/"+b.Digest {
		t.Fatalf("slot url = %q", url)
	}
}
