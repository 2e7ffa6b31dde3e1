package cli

import (
	"bytes"
	"strings"
	"testing"
	"text/tabwriter"

	"github.com/edgefleet/edgefleet/fleet/client"
)

func TestTelemetryUsage(t *testing.T) {
	t.Setenv("EDGEFLEET_CONTROLLER", "http://127.0.0.1:1")
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"telemetry", "--wave", "1"}, 2, "--wave needs --rollout"},
		{[]string{"telemetry", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"telemetry", "--model", "m"}, 1, "cannot reach the controller"},
	} {
		code, _, stderr := run(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, c.code, c.want)
		}
	}
}

func TestTelemetryTable(t *testing.T) {
	var b bytes.Buffer
	tw := tabwriter.NewWriter(&b, 2, 4, 2, ' ', 0)
	TelemetryTable(tw, []client.TelemetryFigures{
		{Model: "risk", Version: "1.2.0", Devices: 3, Count: 1000, Errors: 20, ErrorRate: 0.02, LatencyP50Ms: 0.5, LatencyP95Ms: 1.25, LatencyP99Ms: 3,
			Drift: &client.TelemetryDrift{Outputs: []client.DriftFigure{{Name: "p", PSI: 0.31, JS: 0.04}}, MaxOutputPSI: 0.31, MaxOutputJS: 0.04}},
		{Model: "risk", Version: "1.1.0", DeviceID: "pos-7", Count: 5, Drift: &client.TelemetryDrift{Note: "p is binned on other edges than the reference"}},
	})
	tw.Flush()
	out := b.String()
	for _, want := range []string{"risk@1.2.0", "2.00%", "1.25ms", "0.310", "pos-7", "note risk@1.1.0:", "other edges"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
