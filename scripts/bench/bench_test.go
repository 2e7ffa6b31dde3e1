package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const goTestOutput = `goos: linux
goarch: amd64
pkg: github.com/edgefleet/edgefleet/fleet/sim
cpu: AMD EPYC
BenchmarkFramer-2   	   20000	     60000 ns/op	 900.00 MB/s	       0 B/op	       0 allocs/op
BenchmarkFramer-2   	   20000	     50000 ns/op	 950.00 MB/s	       0 B/op	       0 allocs/op
BenchmarkFramer-2   	   20000	     70000 ns/op	 800.00 MB/s	       0 B/op	       0 allocs/op
PASS
ok  	github.com/edgefleet/edgefleet/fleet/sim	3.2s
pkg: github.com/edgefleet/edgefleet/agent/spool
BenchmarkSQLiteAppend/batch=256-2         	     100	  10000000 ns/op	   123 B/op	  4 allocs/op
BenchmarkSQLiteAppend/batch=256-2         	     100	  12000000 ns/op	   125 B/op	  4 allocs/op
--- FAIL: BenchmarkBroken-2
    x_test.go:1: boom
BenchmarkNoNumbers-2 --- FAIL
FAIL	github.com/edgefleet/edgefleet/agent/other	0.1s
`

func TestParseGoBench(t *testing.T) {
	benches, failed := parseGoBench(strings.NewReader(goTestOutput))
	if len(benches) != 2 {
		t.Fatalf("%d benchmarks, want 2: %+v", len(benches), benches)
	}
	f := benches[0]
	if f.Pkg != "github.com/edgefleet/edgefleet/fleet/sim" || f.Name != "BenchmarkFramer" || f.Runs != 3 {
		t.Fatalf("first: %+v", f)
	}
	if f.Metrics["ns/op"] != 60000 || f.Metrics["MB/s"] != 900 || f.Metrics["allocs/op"] != 0 {
		t.Fatalf("medians %v; want ns/op 60000, MB/s 900", f.Metrics)
	}
	s := benches[1]
	if s.Name != "BenchmarkSQLiteAppend/batch=256" || s.Metrics["ns/op"] != 11000000 || s.Metrics["B/op"] != 124 {
		t.Fatalf("second (even count, mean of the middle two): %+v", s)
	}
	if len(failed) != 2 || !strings.Contains(failed[0], "BenchmarkBroken") || !strings.Contains(failed[1], "agent/other") {
		t.Fatalf("failed %q", failed)
	}
}

func FuzzParseGoBench(f *testing.F) {
	f.Add(goTestOutput)
	f.Add("BenchmarkX-2 1 2 ns/op 3")
	f.Add("pkg: \nBenchmark 1 NaN ns/op")
	f.Fuzz(func(t *testing.T, out string) {
		benches, _ := parseGoBench(strings.NewReader(out))
		for _, b := range benches {
			if b.Runs < 0 || b.Name == "" {
				t.Fatalf("bad benchmark %+v", b)
			}
		}
	})
}

func TestParseProc(t *testing.T) {
	status := "Name:\tfleet-agent\nVmPeak:\t 1000 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t7\n"
	rss, peak, err := parseStatus([]byte(status))
	if err != nil || rss != 10<<20 || peak != 20<<20 {
		t.Fatalf("parseStatus = %d, %d, %v", rss, peak, err)
	}
	for _, bad := range []string{"", "VmRSS: x kB\n", "VmRSS: 10 MB\n", "Name: a\n"} {
		if _, _, err := parseStatus([]byte(bad)); err == nil {
			t.Errorf("parseStatus(%q): no error", bad)
		}
	}
	// The command name may hold spaces and parentheses.
	stat := "4242 (fleet (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 25 0 0 20 0 9 0 100 1000 200"
	cpu, err := parseStat([]byte(stat))
	if err != nil || cpu != 1750*time.Millisecond {
		t.Fatalf("parseStat = %s, %v; want 1.75s", cpu, err)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 a b c d e"} {
		if _, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q): no error", bad)
		}
	}
	if got := cpuModel("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags : x\n"); got != "AMD EPYC 7B13" {
		t.Errorf("cpuModel = %q", got)
	}
	if got := memTotal("MemTotal:       24683520 kB\nMemFree: 1 kB\n"); got != 24683520<<10 {
		t.Errorf("memTotal = %d", got)
	}
}

func TestParseMetric(t *testing.T) {
	text := "# HELP x y\n# TYPE edgefleet_controller_telemetry_batches_total counter\nedgefleet_controller_telemetry_batches_total 1234\nedgefleet_other{a=\"b\"} 5\n"
	if v, err := parseMetric(strings.NewReader(text), "edgefleet_controller_telemetry_batches_total"); err != nil || v != 1234 {
		t.Fatalf("parseMetric = %v, %v", v, err)
	}
	if _, err := parseMetric(strings.NewReader(text), "edgefleet_missing"); err == nil {
		t.Fatal("a missing metric gave no error")
	}
}

func TestReplaceSection(t *testing.T) {
	section := "## End-to-end benchmarks\n\nnew figures\n"
	fresh, err := replaceSection("", section)
	if err != nil || !strings.HasPrefix(fresh, "# Benchmarks") || !strings.Contains(fresh, beginMarker+"\n"+section+endMarker+"\n") {
		t.Fatalf("new file:\n%s\n%v", fresh, err)
	}
	others := "# Benchmarks\n\n## Compiler (someone else's)\n\nkeep me\n"
	added, err := replaceSection(others, section)
	if err != nil || !strings.HasPrefix(added, others) || !strings.Contains(added, "new figures") {
		t.Fatalf("appended:\n%s\n%v", added, err)
	}
	// Running again replaces only the marked block.
	again, err := replaceSection(added+"\n## After (also someone else's)\n", "## End-to-end benchmarks\n\nnewer\n")
	if err != nil || strings.Contains(again, "new figures") || !strings.Contains(again, "newer") ||
		!strings.Contains(again, "keep me") || !strings.Contains(again, "## After") {
		t.Fatalf("replaced:\n%s\n%v", again, err)
	}
	if strings.Count(again, beginMarker) != 1 || strings.Count(again, endMarker) != 1 {
		t.Fatalf("markers duplicated:\n%s", again)
	}
	for _, broken := range []string{
		"x\n" + beginMarker + "\nno end\n",
		"x\n" + endMarker + "\n" + beginMarker + "\n",
		beginMarker + "\n" + endMarker + "\n" + beginMarker + "\n" + endMarker + "\n",
	} {
		if _, err := replaceSection(broken, section); err == nil {
			t.Errorf("damaged markers accepted:\n%s", broken)
		}
	}
}

func FuzzReplaceSection(f *testing.F) {
	f.Add("# Benchmarks\n\nother\n", "## mine\n")
	f.Add(beginMarker+"\nold\n"+endMarker+"\ntail\n", "new")
	f.Fuzz(func(t *testing.T, doc, section string) {
		if strings.Contains(section, beginMarker) || strings.Contains(section, endMarker) {
			return
		}
		out, err := replaceSection(doc, section)
		if err != nil {
			return
		}
		if strings.Count(out, beginMarker) != 1 || strings.Count(out, endMarker) != 1 {
			t.Fatalf("result has %d begin and %d end markers", strings.Count(out, beginMarker), strings.Count(out, endMarker))
		}
		// Idempotent: writing the same section again changes nothing.
		again, err := replaceSection(out, section)
		if err != nil || again != out {
			t.Fatalf("second write changed the file (%v)", err)
		}
	})
}

func TestWriteReport(t *testing.T) {
	path := filepath.Join(t.TempDir(), "BENCHMARKS.md")
	if err := os.WriteFile(path, []byte("# Benchmarks\n\nhand-written\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeReport(path, "## mine\n"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if !strings.Contains(string(b), "hand-written") || !strings.Contains(string(b), "## mine") {
		t.Fatalf("report:\n%s", b)
	}
}

// The targets are judged on the medians, and a miss says by how much.
func TestEvaluate(t *testing.T) {
	r := &results{
		Rollout: []rolloutResult{{Broker: "embedded", Devices: 10000, CtlPeak: 1100 << 20, Runs: []rolloutRun{
			{Version: "2.0.0", Phase: "succeeded", Rollout: 50 * time.Second, Decisions: []time.Duration{10 * time.Millisecond, 2 * time.Second}},
			{Version: "3.0.0", Phase: "succeeded", Rollout: 70 * time.Second, Decisions: []time.Duration{10 * time.Millisecond}},
			{Version: "4.0.0", Phase: "succeeded", Rollout: 80 * time.Second, Decisions: []time.Duration{20 * time.Millisecond}},
			{Version: "5.0.0", Phase: "aborted", Rollout: 10 * time.Second, Err: "rollout ended aborted"},
		}}},
		Ingest: []ingestResult{{Broker: "embedded", Encoding: "plain", Raw: []float64{1000, 1000, 1000}, Ingest: []float64{900, 700, 850}}},
		Agent:  &agentResult{BinaryBytes: 12 << 20, Static: true, Idle: []idleModel{{Model: "m 1.0.0", RSS: []int64{25 << 20, 21 << 20, 30 << 20}}}},
	}
	r.evaluate()
	got := map[string]target{}
	for _, tg := range r.Targets {
		got[strings.SplitN(tg.What, " (", 2)[0]] = tg
	}
	check := func(name string, met bool, measured, miss string) {
		t.Helper()
		tg, ok := got[name]
		if !ok {
			t.Fatalf("no target %q in %+v", name, r.Targets)
		}
		if tg.Met == nil || *tg.Met != met || tg.Measured != measured || !strings.Contains(tg.Miss, miss) {
			t.Errorf("%s: met=%v measured=%q miss=%q; want met=%v measured=%q miss~%q", name, *tg.Met, tg.Measured, tg.Miss, met, measured, miss)
		}
	}
	check("10000 devices, 4 waves, zero soak", false, "70.0 s", "over by 10s (17%)")
	check("wave decision latency, worst wave", true, "20 ms", "")
	check("controller peak memory", false, "1100.0 MiB", "over by 146 MiB (15%)")
	check("controller ingest / raw QoS 1 delivery", true, "0.85×", "")
	check("agent: stripped static binary", true, "12,582,912 bytes (12.58 MB, 12.00 MiB) (static: true)", "")
	check("agent: idle resident memory, one compiled model", false, "25.0 MiB", "over by 5.93 MiB (31%)")
	if !r.controllerMissed() {
		t.Error("controllerMissed = false with the rollout over 60 s")
	}
	md := r.markdown()
	for _, want := range []string{"### Targets", "**missed**: over by 10s (17%)", "| embedded | 10000 | 70.0 s (3 of 4 runs finished) |", "| embedded | 10000 | run 4: 5.0.0 | 10.0 s | aborted (0 of 10000 devices on 5.0.0 when the bench stopped waiting) |", "0.85×", "12,582,912 bytes (12.58 MB, 12.00 MiB), static: true"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

func TestSizeByModule(t *testing.T) {
	syms := []symbol{
		{"runtime.mallocgc", 4000},
		{"runtime.(*mheap).alloc", 1000},
		{"github.com/tetratelabs/wazero/internal/engine/wazevo.(*callEngine).init", 3000},
		{"modernc.org/sqlite/lib._sqlite3VdbeExec", 2000},
		{"github.com/edgefleet/edgefleet/agent/deploy.(*Manager).Run", 500},
		{"go:itab.*os.File,io.Reader", 300},
		{"net/http.(*Transport).RoundTrip", 200},
		{"github.com/eclipse/paho%2emqtt%2egolang.(*client).Connect", 100},
	}
	got := sizeByModule(syms, 5)
	want := []string{"std: runtime", "github.com/tetratelabs/wazero", "modernc.org/sqlite", "github.com/edgefleet/edgefleet/agent", "(runtime tables, types)"}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i, w := range want {
		if !strings.HasPrefix(got[i], w+" ") {
			t.Errorf("line %d = %q, want module %q", i, got[i], w)
		}
	}
	if !strings.Contains(got[0], "45.0%") {
		t.Errorf("runtime share: %q (5000 of 11100 bytes)", got[0])
	}
	for sym, mod := range map[string]string{
		"github.com/eclipse/paho%2emqtt%2egolang.(*client).Connect": "github.com/eclipse/paho.mqtt.golang",
		"google.golang.org/protobuf/proto.Marshal":                  "google.golang.org/protobuf",
		"golang.org/x/sync/errgroup.(*Group).Go":                    "golang.org/x/sync",
		"crypto/ed25519.Verify":                                     "std: crypto",
		"type:.eq.[2]interface {}":                                  "(runtime tables, types)",
	} {
		if got := moduleOf(sym); got != mod {
			t.Errorf("moduleOf(%q) = %q, want %q", sym, got, mod)
		}
	}
}

// A run of some parts keeps the other parts' last figures from -results,
// with the time they were measured, and replaces its own.
func TestMergeResults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "results.json")
	first := &results{Command: "go run ./scripts/bench"}
	first.timed("agent")()
	first.timed("ingest")()
	first.Agent = &agentResult{BinaryBytes: 12 << 20, Static: true}
	first.Ingest = []ingestResult{{Broker: "embedded", Encoding: "plain", Raw: []float64{100}, Ingest: []float64{50}}}
	if err := first.save(path); err != nil {
		t.Fatal(err)
	}
	second := &results{Command: "go run ./scripts/bench -only ingest"}
	if err := second.mergeFrom(path, map[string]bool{"ingest": true}); err != nil {
		t.Fatal(err)
	}
	if second.Agent == nil || second.Agent.BinaryBytes != 12<<20 || second.Parts["agent"] == nil {
		t.Errorf("agent figures not kept: %+v, parts %v", second.Agent, second.Parts)
	}
	if second.Ingest != nil || second.Parts["ingest"] != nil {
		t.Errorf("ingest figures kept although this run measures them: %+v", second.Ingest)
	}
	if md := second.markdown(); !strings.Contains(md, "by `go run ./scripts/bench`") {
		t.Errorf("the agent section does not say which run measured it:\n%s", md)
	}
	if err := second.mergeFrom(filepath.Join(t.TempDir(), "none.json"), nil); err != nil {
		t.Errorf("a missing -results file: %v", err)
	}
	if err := os.WriteFile(path, []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := second.mergeFrom(path, nil); err == nil || !strings.Contains(err.Error(), "delete it") {
		t.Errorf("a damaged -results file: %v", err)
	}
}
