package agent

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// gridWithReference is the grid-anomaly example bundle with a drift
// reference on its four features and its score.
func gridWithReference(t *testing.T, version string) []byte {
	t.Helper()
	b := modeltest.ExampleBundle(t, "grid-anomaly", version)
	m := b.Manifest
	m.Reference = &bundle.Reference{Rows: 100,
		Features: []bundle.RefHistogram{
			{Name: "volts", Edges: []float64{220, 230, 240}, Counts: []uint64{10, 40, 40, 10}},
			{Name: "amps", Edges: []float64{5, 15}, Counts: []uint64{20, 60, 20}},
			{Name: "hertz", Edges: []float64{49.9, 50.1}, Counts: []uint64{5, 90, 5}},
			{Name: "celsius", Edges: []float64{20, 40}, Counts: []uint64{30, 50, 20}},
		},
		Outputs: []bundle.RefHistogram{{Name: "score", Edges: []float64{0.1, 0.5, 0.9}, Counts: []uint64{90, 5, 3, 2}}},
	}
	nb, err := bundle.New(m, b.Module)
	if err != nil {
		t.Fatal(err)
	}
	data, err := nb.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestTelemetryRecords runs a real agent with a real model on a real
// broker and checks what issue 6 adds on the device: compressed batches,
// per-interval aggregates on the manifest's reference edges, sampled raw
// inputs, drops by class in the reported state, and /metrics.
func TestTelemetryRecords(t *testing.T) {
	broker := brokertest.Start(t)
	ctl := broker.Controller(t)
	art := &bundles{}
	srv := httptest.NewServer(art)
	defer srv.Close()
	v1 := art.add("grid-anomaly", "1.0.0", gridWithReference(t, "1.0.0"))
	v1.SampleRate = 1
	h := modeltest.NewHost(t, host.Options{PoolSize: 2})
	cfg := DefaultConfig()
	cfg.ID, cfg.Data, cfg.Broker, cfg.Controller = dev, t.TempDir(), broker.URL(), srv.URL
	cfg.AggregateInterval = time.Second
	cfg.AllowUnsigned = true // the test's desired states are unsigned
	a := startAgent(t, cfg, h, nil)

	hello := ctl.WaitFor(10*time.Second, "hello", brokertest.Kind(dev, wire.KindHello)).Env.GetHello()
	if !slices.Contains(hello.GetCapabilities(), wire.CapabilityTelemetryZstd) {
		t.Fatalf("hello capabilities %v lack %s", hello.GetCapabilities(), wire.CapabilityTelemetryZstd)
	}
	ctl.Send(dev, wire.KindDesired, desired(1, v1))
	ctl.WaitFor(30*time.Second, "ACTIVATED", event(pb.EventKind_EVENT_KIND_ACTIVATED, 1))
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { autoAck(ctx, ctl) })
	defer wg.Wait()
	defer cancel()

	const calls = 30
	for range calls {
		if r := infer(t, a.addr); r.Code != 200 {
			t.Fatalf("infer %+v", r)
		}
	}
	// The aggregates of the interval(s) the calls fell in add up to the
	// calls; their features are binned on the reference's edges: the
	// request is volts 230, amps 10, hertz 50, celsius 35.
	var aggs []*pb.InferenceAggregate
	var samples []*pb.RawSample
	seen := map[uint64]bool{}
	compressed := 0
	ctl.WaitFor(20*time.Second, "aggregates of 30 calls", func(m brokertest.Message) bool {
		if m.Compressed {
			compressed++
		}
		for _, r := range m.Env.GetTelemetry().GetRecords() {
			if seen[r.GetSeq()] {
				continue
			}
			seen[r.GetSeq()] = true
			if g := r.GetAggregate(); g != nil && g.GetVersion() == "1.0.0" {
				aggs = append(aggs, g)
			}
			if s := r.GetSample(); s != nil {
				samples = append(samples, s)
			}
		}
		var n uint64
		for _, g := range aggs {
			n += g.GetCount()
		}
		return n >= calls
	})
	if compressed == 0 {
		t.Fatal("no telemetry batch came compressed")
	}
	var count uint64
	features := map[string][]uint64{}
	for _, g := range aggs {
		count += g.GetCount()
		if g.GetSlot() != "default" || g.GetRolloutId() != "r-1" || g.GetIntervalMs() != 1000 || g.GetStartUnixMs()%1000 != 0 || g.GetErrors() != 0 {
			t.Fatalf("aggregate %v", g)
		}
		for _, f := range g.GetFeatures() {
			c := features[f.GetName()]
			if c == nil {
				c = make([]uint64, len(f.GetHistogram().GetCounts()))
			}
			for i, v := range f.GetHistogram().GetCounts() {
				c[i] += v
			}
			features[f.GetName()] = c
		}
		if len(g.GetOutputs()) != 1 || g.GetOutputs()[0].GetName() != "score" {
			t.Fatalf("aggregate outputs %v", g.GetOutputs())
		}
	}
	want := map[string]string{"volts": "[0 0 30 0]", "amps": "[0 30 0]", "hertz": "[0 30 0]", "celsius": "[0 30 0]"}
	for name, w := range want {
		if got := fmt.Sprint(features[name]); got != w {
			t.Errorf("feature %s counts %s, want %s", name, got, w)
		}
	}
	if count != calls {
		t.Fatalf("aggregates count %d calls, want %d", count, calls)
	}
	// sample_rate 1 samples every call; each sample is the call's inputs.
	ctl.WaitFor(20*time.Second, "30 samples", func(m brokertest.Message) bool {
		for _, r := range m.Env.GetTelemetry().GetRecords() {
			if s := r.GetSample(); s != nil && !seen[r.GetSeq()] {
				seen[r.GetSeq()] = true
				samples = append(samples, s)
			}
		}
		return len(samples) >= calls
	})
	in, err := tensor.DecodeFrame(samples[0].GetInputs())
	if err != nil {
		t.Fatal(err)
	}
	if vals, _ := in[0].Float32s(); len(in) != 1 || in[0].Name != "readings" || fmt.Sprint(vals) != "[230 10 50 35]" || samples[0].GetVersion() != "1.0.0" {
		t.Fatalf("sample %v decodes to %v", samples[0], in)
	}

	// Sampling off (the default) samples nothing more.
	v1b := art.add("grid-anomaly", "1.0.0", gridWithReference(t, "1.0.0"))
	ctl.Send(dev, wire.KindDesired, desired(2, v1b))
	ctl.WaitFor(10*time.Second, "generation 2 reported", state(func(s *pb.ReportedState) bool { return s.GetDesiredGeneration() == 2 }))
	before := a.samplesOf(t)
	for range 10 {
		infer(t, a.addr)
	}
	if after := a.samplesOf(t); after != before {
		t.Fatalf("sample_rate 0 sampled %v calls", after-before)
	}

	// The reported state carries the drop counters by class.
	st := ctl.WaitFor(10*time.Second, "state with drops by class", state(func(s *pb.ReportedState) bool {
		return len(s.GetSpoolDroppedByClass()) == 4
	})).Env.GetState()
	for _, c := range []string{"sample", "inference", "aggregate", "event"} {
		if v, ok := st.GetSpoolDroppedByClass()[c]; !ok || v != 0 {
			t.Fatalf("spool_dropped_by_class %v", st.GetSpoolDroppedByClass())
		}
	}

	// /metrics is valid exposition format and has the figures.
	_, body := get(t, "http://"+a.addr+"/metrics")
	fams := parseExposition(t, body)
	for _, name := range []string{
		"edgefleet_agent_inference_latency_seconds", "edgefleet_agent_inference_errors_total", "edgefleet_agent_spool_depth",
		"edgefleet_agent_spool_dropped_by_class_total", "edgefleet_agent_telemetry_inflight_batches", "edgefleet_agent_telemetry_window_batches",
		"edgefleet_agent_mqtt_reconnects_total", "edgefleet_agent_mqtt_dropped_total", "edgefleet_agent_telemetry_bytes_total",
	} {
		if fams[name] == nil {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	lat := fams["edgefleet_agent_inference_latency_seconds"]
	if got := lat.value(`edgefleet_agent_inference_latency_seconds_count{model="grid-anomaly",version="1.0.0"}`); got != calls+10 {
		t.Errorf("latency histogram counts %v calls, want %d", got, calls+10)
	}
	if got := fams["edgefleet_agent_telemetry_window_batches"].value("edgefleet_agent_telemetry_window_batches"); got != 4 {
		t.Errorf("window %v, want the default 4", got)
	}
}

// samplesOf reads the spooled-samples counter from /metrics.
func (ra *runningAgent) samplesOf(t *testing.T) float64 {
	_, body := get(t, "http://"+ra.addr+"/metrics")
	return parseExposition(t, body)["edgefleet_agent_samples_total"].value(`edgefleet_agent_samples_total{outcome="spooled"}`)
}

type family struct {
	typ     string
	samples map[string]float64 // series (name and labels as written) -> value
}

func (f *family) value(series string) float64 {
	if f == nil {
		return math.NaN()
	}
	v, ok := f.samples[series]
	if !ok {
		return math.NaN()
	}
	return v
}

var (
	seriesRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*"(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*)?\})? (\S+)$`)
	leRE     = regexp.MustCompile(`le="([^"]*)"`)
)

// parseExposition parses the Prometheus text format strictly enough to
// catch what a scraper would refuse: every sample belongs to the family
// whose HELP and TYPE came before it, names and labels are well formed,
// values parse, no series repeats, and each histogram's buckets are
// cumulative and end in +Inf equal to _count.
func parseExposition(t *testing.T, body string) map[string]*family {
	t.Helper()
	fams := map[string]*family{}
	var cur string
	sc := bufio.NewScanner(strings.NewReader(body))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case line == "":
			continue
		case strings.HasPrefix(line, "# HELP "):
			cur = strings.Fields(line)[2]
			if fams[cur] != nil {
				t.Fatalf("line %d: family %s twice", n, cur)
			}
			fams[cur] = &family{samples: map[string]float64{}}
			continue
		case strings.HasPrefix(line, "# TYPE "):
			f := strings.Fields(line)
			if len(f) != 4 || f[2] != cur || !slices.Contains([]string{"counter", "gauge", "histogram", "untyped", "summary"}, f[3]) {
				t.Fatalf("line %d: %q does not type family %s", n, line, cur)
			}
			fams[cur].typ = f[3]
			continue
		case strings.HasPrefix(line, "#"):
			continue
		}
		m := seriesRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("line %d: %q is not a sample", n, line)
		}
		name := m[1]
		f := fams[cur]
		if f == nil || f.typ == "" {
			t.Fatalf("line %d: sample %s before any HELP/TYPE", n, name)
		}
		if name != cur && !(f.typ == "histogram" && (name == cur+"_bucket" || name == cur+"_sum" || name == cur+"_count")) {
			t.Fatalf("line %d: sample %s in family %s", n, name, cur)
		}
		v, err := strconv.ParseFloat(m[len(m)-1], 64)
		if err != nil {
			t.Fatalf("line %d: value %q: %v", n, m[len(m)-1], err)
		}
		series := strings.TrimSuffix(line, " "+m[len(m)-1])
		if _, dup := f.samples[series]; dup {
			t.Fatalf("line %d: series %s twice", n, series)
		}
		f.samples[series] = v
	}
	for name, f := range fams {
		if f.typ != "histogram" {
			continue
		}
		// Per label set: buckets rise, the +Inf one equals _count.
		inf := map[string]float64{}
		for series, v := range f.samples {
			if !strings.HasPrefix(series, name+"_bucket") {
				continue
			}
			key := leRE.ReplaceAllString(series, "")
			if le := leRE.FindStringSubmatch(series); le != nil && le[1] == "+Inf" {
				inf[key] = v
			}
		}
		for key, v := range inf {
			countSeries := strings.Replace(strings.Replace(key, "_bucket", "_count", 1), ",}", "}", 1)
			countSeries = strings.Replace(countSeries, "{}", "", 1)
			if c, ok := f.samples[countSeries]; !ok || c != v {
				t.Fatalf("histogram %s: +Inf bucket %v, %s = %v", name, v, countSeries, c)
			}
		}
		checkCumulative(t, body, name)
	}
	return fams
}

// checkCumulative checks, in written order, that the buckets of each
// series of histogram name never decrease.
func checkCumulative(t *testing.T, body, name string) {
	t.Helper()
	prev := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name+"_bucket") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, _ := strconv.ParseFloat(line[i+1:], 64)
		key := leRE.ReplaceAllString(line[:i], "")
		if p, ok := prev[key]; ok && v < p {
			t.Fatalf("histogram %s: bucket %q below the one before (%v)", name, line, p)
		}
		prev[key] = v
	}
}
