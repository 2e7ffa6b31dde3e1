package controller

import (
	"bufio"
	"bytes"
	"math"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/edgefleet/edgefleet/controller/api"
	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// parseMetrics reads the Prometheus text format strictly: every line is a
// comment or `name{labels} value` with a number, and every sample's family
// has a TYPE line before it.
func parseMetrics(t *testing.T, text []byte) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	typed := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			typed[strings.Fields(f)[0]] = true
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("metrics line %q has no value", line)
		}
		name, val := line[:i], line[i+1:]
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			t.Fatalf("metrics line %q: value: %v", line, err)
		}
		family, _, _ := strings.Cut(name, "{")
		base := family
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(family, suf); ok && typed[b] {
				base = b
			}
		}
		if !typed[base] {
			t.Fatalf("metrics line %q: no TYPE line for %s before it", line, base)
		}
		out[name] = v
	}
	return out
}

// TestTelemetryCompressedQueriedAndMeasured sends compressed batches with
// an agent's aggregate, refuses bad compressed ones and counts them, reads
// the figures back through the API (drift against the manifest's
// reference), and checks /metrics.
func TestTelemetryCompressedQueriedAndMeasured(t *testing.T) {
	h := start(t, t.TempDir(), nil)
	spec := []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 3}}}
	man := bundle.Manifest{ABI: 1, Name: "grid", Version: "1.0.0", Inputs: spec, Outputs: spec,
		Reference: &bundle.Reference{Rows: 100, Outputs: []bundle.RefHistogram{{Name: "x[0]", Edges: []float64{0.5}, Counts: []uint64{50, 50}}}}}
	b, err := bundle.New(man, bytes.Repeat([]byte("\x00asm-not-really"), 10))
	if err != nil {
		t.Fatal(err)
	}
	h.call("POST", "/v1/models", encode(t, b), http.StatusCreated, nil)

	dev := testdevice.Connect(t, h.mqtt, "grid-9")
	acks := dev.Subscribe(wire.KindAck)
	enc, err := wire.NewBatchEncoder()
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	agg := &pb.InferenceAggregate{Slot: "default", Model: "grid", Version: "1.0.0", StartUnixMs: now.UnixMilli(), IntervalMs: 10_000,
		Count: 100, Errors: 5, Timeouts: 2, LatencyUs: summary.NewLatency(),
		Outputs: []*pb.NamedHistogram{{Name: "x[0]", Histogram: &pb.Histogram{Bounds: []float64{0.5}, Counts: []uint64{90, 10}}}}}
	summary.Observe(agg.LatencyUs, 2000, 95)
	batch := &pb.TelemetryBatch{SpoolEpoch: "e1", Records: []*pb.TelemetryRecord{
		{Seq: 1, Body: &pb.TelemetryRecord_Aggregate{Aggregate: agg}},
		// The same minute's per-inference record: the aggregate counts it.
		{Seq: 2, Body: &pb.TelemetryRecord_Inference{Inference: &pb.InferenceRecord{Model: "grid", Version: "1.0.0", AtUnixMs: now.UnixMilli(), LatencyUs: 2000}}},
	}}
	z, err := enc.Compress(batch)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second is a resend: acked again, stored once
		dev.Send(wire.KindTelemetry, &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: z}})
		if r := dev.Next(acks).GetAck().GetStored(); len(r) != 1 || r[0].GetFirst() != 1 || r[0].GetLast() != 2 {
			t.Fatalf("ack = %v", r)
		}
	}
	// Refused: not zstd at all, and a small frame that expands past the cap.
	bomb, _ := zstd.NewWriter(nil)
	big := bomb.EncodeAll(make([]byte, wire.MaxDecompressed+1), nil)
	for _, bad := range [][]byte{[]byte("not zstd"), big} {
		dev.Send(wire.KindTelemetry, &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: bad}})
	}
	dev.Send(wire.KindState, &pb.ReportedState{SpoolDroppedByClass: map[string]uint64{"sample": 7, "inference": 3}})
	testdevice.Eventually(t, func() (bool, string) {
		got := h.metric(`edgefleet_controller_telemetry_batches_refused_total{reason="zstd"}`)
		return got == "2", "refused compressed batches: " + got
	})

	var sum api.TelemetrySummary
	h.call("GET", "/v1/telemetry?model=grid&since=2h", nil, http.StatusOK, &sum)
	if len(sum.Groups) != 1 {
		t.Fatalf("groups = %+v", sum.Groups)
	}
	g := sum.Groups[0]
	psi := 0.4*math.Log(0.9/0.5) + (-0.4)*math.Log(0.1/0.5)
	if g.Count != 100 || g.Errors != 5 || g.Timeouts != 2 || g.ErrorRate != 0.05 || g.Devices != 1 ||
		math.Abs(g.LatencyP95Ms-2) > 0.2 || g.Drift == nil || math.Abs(g.Drift.MaxOutputPSI-psi) > 1e-9 || g.Drift.Observed != 100 {
		t.Fatalf("figures = %+v (drift %+v); want 100 inferences, 5 errors, p95 ~2ms, PSI %.6f", g, g.Drift, psi)
	}
	var one api.TelemetrySummary
	h.call("GET", "/v1/devices/grid-9/telemetry?since=2h", nil, http.StatusOK, &one)
	if len(one.Groups) != 1 || one.Groups[0].Count != 100 {
		t.Fatalf("device figures = %+v", one.Groups)
	}
	h.call("GET", "/v1/devices/other/telemetry", nil, http.StatusOK, &one)
	if len(one.Groups) != 0 {
		t.Fatalf("figures of a silent device = %+v", one.Groups)
	}
	h.apiError("GET", "/v1/telemetry?since=yesterday", nil, http.StatusBadRequest, "RFC 3339")
	h.apiError("GET", "/v1/telemetry?wave=1", nil, http.StatusBadRequest, "wave needs rollout")
	h.apiError("GET", "/v1/telemetry?by=minute", nil, http.StatusBadRequest, "by=")

	_, text := h.do("GET", "/metrics", nil, nil)
	m := parseMetrics(t, text)
	for name, want := range map[string]func(float64) bool{
		"edgefleet_controller_telemetry_records_stored_total":                 func(v float64) bool { return v == 2 },
		"edgefleet_controller_telemetry_duplicates_total":                     func(v float64) bool { return v == 2 },
		"edgefleet_controller_telemetry_batches_total":                        func(v float64) bool { return v == 2 },
		"edgefleet_controller_telemetry_commit_seconds_count":                 func(v float64) bool { return v >= 1 },
		"edgefleet_controller_telemetry_ack_seconds_count":                    func(v float64) bool { return v == 2 },
		`edgefleet_controller_telemetry_ack_seconds_bucket{le="+Inf"}`:        func(v float64) bool { return v == 2 },
		`edgefleet_controller_agent_spool_dropped{class="sample"}`:            func(v float64) bool { return v == 7 },
		`edgefleet_controller_agent_spool_dropped{class="inference"}`:         func(v float64) bool { return v == 3 },
		"edgefleet_controller_broker_clients_connected":                       func(v float64) bool { return v >= 2 },
		"edgefleet_controller_broker_messages_received":                       func(v float64) bool { return v >= 5 },
		`edgefleet_controller_telemetry_batches_refused_total{reason="zstd"}`: func(v float64) bool { return v == 2 },
	} {
		if v, ok := m[name]; !ok || !want(v) {
			t.Errorf("metric %s = %v (present %v)", name, v, ok)
		}
	}
	if !bytes.Contains(text, []byte("# TYPE edgefleet_controller_rollouts gauge")) {
		t.Error("no rollouts gauge in /metrics")
	}
}
