package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// fakeRollouts is the rollout API of a controller, canned: it records the
// specifications it is sent and streams the given rollout pictures.
type fakeRollouts struct {
	mu       sync.Mutex
	created  []map[string]any
	dryRuns  int
	actions  []string
	pictures []string // Rollout documents streamed by /events, in order
}

func (f *fakeRollouts) serve(t *testing.T) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		switch {
		case r.Method == "POST" && r.URL.Path == "/v1/rollouts":
			b, _ := io.ReadAll(r.Body)
			var spec map[string]any
			if err := json.Unmarshal(b, &spec); err != nil {
				t.Errorf("spec is not JSON: %s", b)
			}
			if r.URL.Query().Get("dryRun") == "true" {
				f.dryRuns++
				fmt.Fprint(w, `{"id":"r1","targets":3,"failureBudget":0,"waves":[{"index":0,"devices":["a"],"strata":{"x":1}},{"index":1,"devices":["b","c"]}]}`)
				return
			}
			f.created = append(f.created, spec)
			w.WriteHeader(http.StatusCreated)
			fmt.Fprint(w, f.pictures[0])
		case r.Method == "POST" && strings.HasPrefix(r.URL.Path, "/v1/rollouts/r1/"):
			f.actions = append(f.actions, strings.TrimPrefix(r.URL.Path, "/v1/rollouts/r1/"))
			fmt.Fprint(w, f.pictures[0])
		case r.URL.Path == "/v1/rollouts":
			fmt.Fprintf(w, `{"rollouts":[%s]}`, f.pictures[len(f.pictures)-1])
		case r.URL.Path == "/v1/rollouts/r1":
			fmt.Fprint(w, f.pictures[len(f.pictures)-1])
		case r.URL.Path == "/v1/rollouts/r1/devices":
			if r.URL.RawQuery != "step=failed&wave=0" {
				t.Errorf("devices query %q", r.URL.RawQuery)
			}
			fmt.Fprint(w, `{"devices":[{"device":"dev-7","wave":0,"step":"failed","previous":"m@1.0.0","generation":4,"failure":"the device refused it"}]}`)
		case r.URL.Path == "/v1/rollouts/r1/events":
			w.Header().Set("Content-Type", "text/event-stream")
			for i, p := range f.pictures {
				var b bytes.Buffer
				json.Compact(&b, []byte(p))
				fmt.Fprintf(w, "event: rollout\nid: %d\ndata: %s\n\n", i, b.Bytes())
			}
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		default:
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"error":"no such endpoint: %s"}`, r.URL.Path)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func picture(phase, reason string, waves string) string {
	return fmt.Sprintf(`{"id":"r1","model":"m","version":"2.0.0","slot":"default","selector":"region=eu","phase":%q,"reason":%q,
		"revision":7,"wave":1,"targets":20,"failures":1,"failureBudget":2,"steps":{"healthy":3},"late":{},
		"createdAt":"2026-11-27T00:00:00Z","updatedAt":"2026-11-27T00:00:05Z","finishedAt":null,"waves":[%s]}`, phase, reason, waves)
}

const twoWaves = `{"index":0,"size":2,"state":"passed","steps":{"healthy":2},"gates":[]},
	{"index":1,"size":18,"state":"running","approval":false,"steps":{"healthy":9,"downloading":4,"notified":5},"failed":0,
	 "gates":[{"gate":"latency","result":"fail","detail":"p99 31.0ms on 2.0.0 vs 10.0ms on 1.0.0: x3.10 (limit x1.50) ABOVE LIMIT",
	   "figures":[{"name":"p99","value":31,"unit":"ms"},{"name":"p99Ratio","value":3.1,"limit":1.5}]},
	  {"gate":"errorRate","result":"pass","detail":"error rate 0.40%","figures":[{"name":"errorRate","value":0.004,"limit":0.05,"unit":"fraction"}]}]}`

func TestRolloutCreateFromFileAndFlags(t *testing.T) {
	f := &fakeRollouts{pictures: []string{picture("running", "", twoWaves)}}
	t.Setenv("EDGEFLEET_CONTROLLER", f.serve(t))
	dir := t.TempDir()
	file := filepath.Join(dir, "rollout.yaml")
	os.WriteFile(file, []byte(`
name: grid-eu
selector: region=eu,hw in (jetson,rpi5),!lab
model: grid-anomaly@1.1.0
strategy:
  waves: [1%, 10, {size: 50%, approval: true}, 100%]
  stratifyBy: site
  soak: 10m
  gates:
    - {type: errorRate, max: 0.02}
  failureBudget: 2%
`), 0o644)
	code, stdout, stderr := run(t, "rollout", "create", "-f", file)
	if code != 0 || !strings.Contains(stdout, "rollout r1 created") {
		t.Fatalf("create -f: %d %q %q", code, stdout, stderr)
	}
	want := map[string]any{
		"name": "grid-eu", "selector": "region=eu,hw in (jetson,rpi5),!lab", "model": "grid-anomaly@1.1.0",
		"strategy": map[string]any{
			"waves":      []any{"1%", float64(10), map[string]any{"size": "50%", "approval": true}, "100%"},
			"stratifyBy": "site", "soak": "10m", "failureBudget": "2%",
			"gates": []any{map[string]any{"type": "errorRate", "max": 0.02}},
		},
	}
	if !reflect.DeepEqual(f.created[0], want) {
		t.Fatalf("sent %v\nwant %v", f.created[0], want)
	}

	code, _, stderr = run(t, "rollout", "create", "grid-anomaly@1.1.0", "-l", "region=eu", "--waves", "5,50%,100%",
		"--approve-before", "3", "--max-error-rate", "0.05", "--max-latency-ratio", "1.5", "--unreachable", "skip", "--soak", "1m")
	if code != 0 {
		t.Fatalf("create with flags: %d %s", code, stderr)
	}
	st := f.created[1]["strategy"].(map[string]any)
	waves := st["waves"].([]any)
	if len(waves) != 3 || waves[2].(map[string]any)["approval"] != true || waves[0].(map[string]any)["size"] != "5" ||
		st["unreachable"] != "skip" || st["soak"] != "1m" || len(st["gates"].([]any)) != 2 {
		t.Fatalf("flags became %v", f.created[1])
	}

	code, stdout, _ = run(t, "rollout", "create", "-f", file, "--dry-run")
	if code != 0 || f.dryRuns != 1 || !strings.Contains(stdout, "would update 3 devices in 2 waves") || !strings.Contains(stdout, "x=1") {
		t.Fatalf("dry run: %d %q", code, stdout)
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"rollout"}, "want a subcommand"},
		{[]string{"rollout", "dance"}, `unknown rollout subcommand "dance"`},
		{[]string{"rollout", "create"}, "want -f rollout.yaml"},
		{[]string{"rollout", "create", "m"}, "NAME@VERSION"},
		{[]string{"rollout", "create", "m@1"}, "no selector"},
		{[]string{"rollout", "create", "m@1", "-l", "a=b", "--approve-before", "7"}, "only 4 waves"},
		{[]string{"rollout", "create", "m@1", "-l", "a=b", "--approve-before", "first"}, "wave numbers"},
		{[]string{"rollout", "create", "-f", file, "m@1"}, "not both"},
		{[]string{"rollout", "get"}, "want one rollout ID"},
		{[]string{"rollout", "pause"}, "want one rollout ID"},
	} {
		code, _, stderr := run(t, c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, %q; want 2 and %q", c.args, code, stderr, c.want)
		}
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("- just\n- a list\n"), 0o644)
	if code, _, stderr := run(t, "rollout", "create", "-f", bad); code != 1 || !strings.Contains(stderr, "must be a mapping") {
		t.Fatalf("list file: %d %q", code, stderr)
	}
}

func TestRolloutWatchGetAndActions(t *testing.T) {
	f := &fakeRollouts{pictures: []string{
		picture("running", "", twoWaves),
		picture("rolled-back", "gate failed in wave 2: latency (p99 31.0ms on 2.0.0 vs 10.0ms on 1.0.0: x3.10)", twoWaves),
	}}
	t.Setenv("EDGEFLEET_CONTROLLER", f.serve(t))
	code, stdout, stderr := run(t, "rollout", "watch", "r1")
	if code != 1 || !strings.Contains(stderr, "r1 is rolled-back (gate failed in wave 2") {
		t.Fatalf("watch of a rollout that rolls back: exit %d, stderr %q", code, stderr)
	}
	for _, want := range []string{
		"rollout r1: m@2.0.0 into slot default, RUNNING",
		"rollout r1: m@2.0.0 into slot default, ROLLED-BACK",
		"[########################]",
		"] 2/2",
		"] 9/18",
		"notified 5, downloading 4, healthy 9",
		"gate latency         FAIL",
		"gate errorRate       PASS",
		"p99=31ms p99Ratio=3.1 (limit 1.5)",
		"errorRate=0.40% (limit 5.00%)",
		"ABOVE LIMIT",
		"reason: gate failed",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("watch output lacks %q:\n%s", want, stdout)
		}
	}
	// As JSON: one document per picture.
	code, stdout, _ = run(t, "rollout", "watch", "r1", "-o", "json")
	if lines := strings.Split(strings.TrimSpace(stdout), "\n"); code != 1 || len(lines) != 2 || !strings.Contains(lines[1], `"phase":"rolled-back"`) {
		t.Fatalf("watch -o json: %d %q", code, stdout)
	}

	code, stdout, _ = run(t, "rollout", "get", "r1", "--devices", "--step", "failed", "--wave", "1")
	if code != 0 || !strings.Contains(stdout, "dev-7") || !strings.Contains(stdout, "the device refused it") {
		t.Fatalf("get --devices: %d %q", code, stdout)
	}
	code, stdout, _ = run(t, "rollout", "list")
	if code != 0 || !strings.Contains(stdout, "r1") || !strings.Contains(stdout, "rolled-back") || !strings.Contains(stdout, "3/20") {
		t.Fatalf("list: %d %q", code, stdout)
	}
	for _, a := range []string{"pause", "resume", "approve", "abort", "rollback"} {
		if code, stdout, stderr := run(t, "rollout", a, "r1"); code != 0 || !strings.Contains(stdout, "rollout r1: running") {
			t.Fatalf("%s: %d %q %q", a, code, stdout, stderr)
		}
	}
	if !reflect.DeepEqual(f.actions, []string{"pause", "resume", "approve", "abort", "rollback"}) {
		t.Fatalf("actions sent = %v", f.actions)
	}
}

func FuzzSpecYAML(f *testing.F) {
	f.Add([]byte("selector: a=b\nmodel: m@1\nstrategy:\n  waves: [1%, 10, {size: 50%}]\n"))
	f.Add([]byte(`{"selector":"","model":"m@1"}`))
	f.Add([]byte("a: &x [1, *x]\n"))
	f.Add([]byte("? [a]\n: b\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		out, err := SpecYAMLToJSON(data)
		if err != nil {
			return
		}
		var v map[string]any
		if err := json.Unmarshal(out, &v); err != nil {
			t.Fatalf("output is not a JSON object: %v\n%s", err, out)
		}
	})
}

// TestRenderRolloutDecision shows a wave's decision latency, once the
// controller measured it, on the wave's line.
func TestRenderRolloutDecision(t *testing.T) {
	var r client.Rollout
	if err := json.Unmarshal([]byte(`{"id":"r1","model":"m","version":"2.0.0","slot":"default","phase":"running","wave":1,"targets":10,
		"waves":[{"index":0,"size":2,"state":"passed","steps":{"healthy":2},"decisionMs":105.3},
		         {"index":1,"size":8,"state":"running","steps":{"notified":8},"decisionMs":null}]}`), &r); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	RenderRollout(tw, &r, time.Now())
	tw.Flush()
	lines := strings.Split(b.String(), "\n")
	var w1, w2 string
	for _, l := range lines {
		switch {
		case strings.HasPrefix(strings.TrimSpace(l), "wave 1 "):
			w1 = l
		case strings.HasPrefix(strings.TrimSpace(l), "wave 2 "):
			w2 = l
		}
	}
	if !strings.HasSuffix(w1, "healthy 2; next step decided 105 ms after its last device") {
		t.Errorf("wave 1 line %q", w1)
	}
	if strings.Contains(w2, "decided") || !strings.HasSuffix(w2, "notified 8") {
		t.Errorf("wave 2 line %q", w2)
	}
	if decisionTime(3.25) != "3.2 ms" && decisionTime(3.25) != "3.3 ms" {
		t.Errorf("decisionTime(3.25) = %q", decisionTime(3.25))
	}
}
