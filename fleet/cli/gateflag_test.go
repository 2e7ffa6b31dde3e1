package cli

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/edgefleet/edgefleet/fleet/client"
)

func TestParseGate(t *testing.T) {
	cases := []struct {
		expr string
		want client.GateSpec
		err  string
	}{
		{"shadowAgreement>=0.98", client.GateSpec{Type: "shadowAgreement", Min: 0.98}, ""},
		{" shadowAgreement >= 0.95 over 200 tolerance 0.1 ", client.GateSpec{Type: "shadowAgreement", Min: 0.95, MinInferences: 200, Tolerance: 0.1}, ""},
		{"errorRate<=0.02 over 50", client.GateSpec{Type: "errorRate", Max: 0.02, MinInferences: 50}, ""},
		{"latency<=1.5", client.GateSpec{Type: "latency", MaxP95Ratio: 1.5, MaxP99Ratio: 1.5}, ""},
		{"drift<=0.2", client.GateSpec{Type: "drift", Max: 0.2}, ""},
		{"shadowAgreement<=0.98", client.GateSpec{}, "shadowAgreement takes >="},
		{"errorRate>=0.02", client.GateSpec{}, "errorRate takes <="},
		{"shadowAgreement=0.98", client.GateSpec{}, "write TYPE>=VALUE"},
		{"shadowAgreement>=", client.GateSpec{}, "no value"},
		{"shadowAgreement>=NaN", client.GateSpec{}, "not a non-negative number"},
		{"shadowAgreement>=0.98 over", client.GateSpec{}, "wants a value"},
		{"shadowAgreement>=0.98 over -3", client.GateSpec{}, "over \"-3\""},
		{"errorRate<=0.02 tolerance 0.1", client.GateSpec{}, "for shadowAgreement only"},
		{"accuracy>=0.9", client.GateSpec{}, "unknown gate type"},
		{"shadowAgreement>=0.98 within 5", client.GateSpec{}, "unknown word"},
	}
	for _, c := range cases {
		got, err := parseGate(c.expr)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), "--gate") {
				t.Errorf("parseGate(%q) error %v, want %q", c.expr, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("parseGate(%q) = %+v, %v; want %+v", c.expr, got, err, c.want)
		}
	}
}

func TestWithGates(t *testing.T) {
	spec, err := specFromFlags("m@2", "fleet=t", "", "", "10%,100%", "", "", "", 0, "", "", "", "", 0.02, 0)
	if err != nil {
		t.Fatal(err)
	}
	out, err := withGates(spec, []client.GateSpec{{Type: "shadowAgreement", Min: 0.98, MinInferences: 200}})
	if err != nil {
		t.Fatal(err)
	}
	var got client.RolloutSpec
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	g := got.Strategy.Gates
	if got.Model != "m@2" || len(got.Strategy.Waves) != 2 || len(g) != 2 || g[0].Type != "errorRate" || g[1] != (client.GateSpec{Type: "shadowAgreement", Min: 0.98, MinInferences: 200}) {
		t.Fatalf("spec %s", out)
	}
}

func FuzzParseGate(f *testing.F) {
	for _, s := range []string{"shadowAgreement>=0.98 over 200 tolerance 0.05", "errorRate<=0.02", "latency<=1.5 over 9", "drift<=", "x>=1 over"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, expr string) {
		g, err := parseGate(expr)
		if err != nil {
			return
		}
		if g.Type == "" || g.Min < 0 || g.Max < 0 || g.MinInferences < 0 || g.Tolerance < 0 {
			t.Fatalf("parseGate(%q) accepted %+v", expr, g)
		}
	})
}
