package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// Readings grid-anomaly 1.0.0 and 1.1.0 score alike (a nominal grid, the
// i-th of a varied stream) and apart (a frequency dip, which 1.1.0 weighs
// 2.5 times more: 0.17 against 0.94).
func agreeingRow(i int) []float32 {
	return []float32{225 + float32(i%97)*0.1, 10 + float32(i%13)*0.1, 50 + float32(i%7)*0.01, 35}
}

var dipRow = []float32{230, 10, 49.7, 35}

// traffic posts one-row inferences to every agent until stopped, rows
// chosen by row(i), and counts the versions that answered.
type traffic struct {
	mu       sync.Mutex
	versions map[string]int
	errs     []string
	stop     func()
}

func startTraffic(f *fleet, ids []string, row func(i int) []float32) *traffic {
	tr := &traffic{versions: map[string]int{}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, id := range ids {
		url := "http://" + f.listens[id] + "/v2/models/grid-anomaly/infer"
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "readings", "shape": []int{1, 4}, "datatype": "FP32", "data": row(i)}}})
				v, err := postInfer(ctx, url, body)
				tr.mu.Lock()
				if err != nil && ctx.Err() == nil {
					tr.errs = append(tr.errs, id+": "+err.Error())
				} else if err == nil {
					tr.versions[v]++
				}
				tr.mu.Unlock()
				select {
				case <-ctx.Done():
				case <-time.After(10 * time.Millisecond):
				}
			}
		})
	}
	tr.stop = func() { cancel(); wg.Wait() }
	return tr
}

func postInfer(ctx context.Context, url string, body []byte) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%d %s", resp.StatusCode, b)
	}
	var out struct {
		ModelVersion string `json:"model_version"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", err
	}
	return out.ModelVersion, nil
}

func (tr *traffic) result() (map[string]int, []string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	v := map[string]int{}
	for k, n := range tr.versions {
		v[k] = n
	}
	return v, append([]string(nil), tr.errs...)
}

// TestShadowAgreementGate: two real agents run grid-anomaly 1.0.0
// under live traffic. A rollout of 1.1.0 gated on shadowAgreement first
// runs it in shadow on every device. With traffic full of frequency dips,
// on which 1.1.0 answers differently, the gate fails, the rollout rolls
// back, and no device ever switches: every answer came from 1.0.0. With
// traffic on which the versions agree, the same gate passes and the wave
// switches.
func TestShadowAgreementGate(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	start := time.Now()
	f := startController(t, "")
	// Two devices: each compiles both versions (the Go guest), which is
	// most of this test's time on a loaded machine.
	ids := []string{"shadow-1", "shadow-2"}
	for _, id := range ids {
		f.startAgent(id, "fleet=shadow")
	}
	f.pushExample("1.0.0")
	f.pushExample("1.1.0")
	ctx := context.Background()
	if _, err := f.client.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "fleet=shadow"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", ids...)
	t.Logf("1.0.0 active on every device after %s", time.Since(start).Round(time.Millisecond))

	waitPhase := func(id, phase string, timeout time.Duration) *client.Rollout {
		t.Helper()
		var r *client.Rollout
		f.eventually("rollout "+id+" "+phase, timeout, func() (bool, string) {
			var err error
			if r, err = f.client.Rollout(ctx, id); err != nil {
				return false, err.Error()
			}
			return r.Phase == phase, fmt.Sprintf("%s %q steps %v", r.Phase, r.Reason, r.Steps)
		})
		return r
	}
	gate := func(r *client.Rollout) client.GateVerdict {
		for _, w := range r.Waves {
			for _, v := range w.Gates {
				if v.Gate == "shadowAgreement" {
					return v
				}
			}
		}
		return client.GateVerdict{}
	}

	// Half the traffic flips: the gate fails, nobody switches.
	tr := startTraffic(f, ids, func(i int) []float32 {
		if i%2 == 1 {
			return dipRow
		}
		return agreeingRow(i)
	})
	if out := f.fleetCLI("rollout", "create", "grid-anomaly@1.1.0", "-l", "fleet=shadow", "--name", "shadow-bad", "--waves", "100%",
		"--soak", "1s", "--gate", "shadowAgreement>=0.98 over 60"); !strings.Contains(out, "shadow-bad") {
		t.Fatalf("fleet rollout create printed %q", out)
	}
	r := waitPhase("shadow-bad", "rolled-back", 60*time.Second)
	tr.stop()
	t.Logf("shadow-bad rolled back after %s: %s", time.Since(start).Round(time.Millisecond), r.Reason)
	if v := gate(r); v.Result != "fail" || !strings.Contains(r.Reason, "gate failed in wave 1: shadowAgreement (agreement ") {
		t.Fatalf("rollout %s %q, gate %+v", r.Phase, r.Reason, v)
	}
	versions, errs := tr.result()
	if len(errs) > 0 || versions["1.0.0"] < 60 || len(versions) != 1 {
		t.Fatalf("answers by version %v, errors %v: want every answer from 1.0.0", versions, errs)
	}
	// A device may still be loading the candidate when the others have
	// given the gate its comparisons: at least one ran it in shadow.
	shadowed := 0
	for _, id := range ids {
		log, _ := os.ReadFile(filepath.Join(f.dir, id+".log"))
		if strings.Contains(activations(log), "1.1.0") {
			t.Fatalf("%s activated 1.1.0:\n%s", id, activations(log))
		}
		if bytes.Contains(log, []byte("candidate in shadow")) {
			shadowed++
		}
	}
	if shadowed == 0 {
		t.Fatalf("no device ran 1.1.0 in shadow\n%s", f.logs())
	}
	f.waitActive("1.0.0", ids...)

	// The versions agree on this traffic: the same gate passes and the
	// wave switches to 1.1.0.
	tr = startTraffic(f, ids, agreeingRow)
	defer tr.stop()
	f.fleetCLI("rollout", "create", "grid-anomaly@1.1.0", "-l", "fleet=shadow", "--name", "shadow-good", "--waves", "100%",
		"--soak", "1s", "--gate", "shadowAgreement>=0.98 over 60")
	r = waitPhase("shadow-good", "succeeded", 60*time.Second)
	t.Logf("shadow-good succeeded after %s", time.Since(start).Round(time.Millisecond))
	if v := gate(r); v.Result != "pass" || !strings.Contains(v.Detail, "agreement 100.00% in ") {
		t.Fatalf("gate %+v", v)
	}
	f.waitActive("1.1.0", ids...)
	f.eventually("answers from 1.1.0", 10*time.Second, func() (bool, string) {
		v, _ := tr.result()
		return v["1.1.0"] > 0, fmt.Sprint(v)
	})
	if _, errs := tr.result(); len(errs) > 0 {
		t.Fatalf("failed requests across the switch: %v", errs[:min(3, len(errs))])
	}
}

// activations lists the versions an agent's log says it activated.
func activations(log []byte) string {
	var out []string
	for _, line := range strings.Split(string(log), "\n") {
		if strings.Contains(line, `msg="model activated"`) {
			for _, f := range strings.Fields(line) {
				if v, ok := strings.CutPrefix(f, "version="); ok {
					out = append(out, v)
				}
			}
		}
	}
	return strings.Join(out, " ")
}
