package cli

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDeviceShowsShadow: `fleet device ID` prints a slot's shadow
// comparison as the API reports it (controller/api's Slot.shadow), both
// in the table and in -o json; a slot without one prints no shadow line.
func TestDeviceShowsShadow(t *testing.T) {
	since := time.Now().Add(-5 * time.Minute).UTC().Format(time.RFC3339)
	device := fmt.Sprintf(`{"id":"dev-1","labels":{},"online":true,"lastSeen":null,"agentVersion":"1.0.0","health":"ok",
		"slots":[{"slot":"default","active":{"name":"m","version":"1.0.0","digest":"aa"},"previous":null,"activeSince":null,"pending":null,"lastError":"",
		  "shadow":{"candidate":{"name":"m","version":"1.1.0","digest":"bb"},"compared":200,"agreed":196,"errors":1,"agreement":0.98,
		    "maxScoreDiff":0.25,"meanScoreDiff":0.0125,"candidateP99Us":1800,"activeP99Us":1500,"since":%q}},
		  {"slot":"other","active":{"name":"n","version":"2.0.0","digest":"cc"},"previous":null,"activeSince":null,"pending":null,"lastError":""}],
		"desired":null,"reportedGeneration":3,"spoolDepth":0,"inferences":0,"inferenceErrors":0,"lastEvents":[]}`, since)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/devices/dev-1" {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"error":"no such endpoint: %s"}`, r.URL.Path)
			return
		}
		fmt.Fprint(w, device)
	}))
	t.Cleanup(srv.Close)
	t.Setenv("EDGEFLEET_CONTROLLER", srv.URL)

	code, stdout, stderr := run(t, "device", "dev-1")
	if code != 0 {
		t.Fatalf("fleet device: %d %q", code, stderr)
	}
	// "since 5m0s ago", or 5m1s on a slow machine.
	want := regexp.MustCompile(`shadow m@1\.1\.0 since 5m[0-9]+s ago: 200 compared, 196 agreed \(98\.00%\), 1 errors, score diff max 0\.25 mean 0\.0125, p99 1\.80ms vs active 1\.50ms`)
	if !want.MatchString(stdout) {
		t.Fatalf("fleet device printed\n%s\nwant a line matching %s", stdout, want)
	}
	if n := strings.Count(stdout, "shadow "); n != 1 {
		t.Fatalf("%d shadow lines, want 1 (slot other has none):\n%s", n, stdout)
	}

	code, stdout, stderr = run(t, "device", "dev-1", "-o", "json")
	if code != 0 || !strings.Contains(stdout, `"agreement": 0.98`) || !strings.Contains(stdout, `"candidateP99Us": 1800`) {
		t.Fatalf("fleet device -o json: %d %q %q", code, stdout, stderr)
	}
}
