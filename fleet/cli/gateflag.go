package cli

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// gateFlags collects --gate expressions (repeatable).
type gateFlags []client.GateSpec

func (g *gateFlags) String() string { return fmt.Sprint(len(*g), " gates") }

func (g *gateFlags) Set(v string) error {
	s, err := parseGate(v)
	if err != nil {
		return err
	}
	*g = append(*g, s)
	return nil
}

// gateHelp is the --gate flag's usage text.
const gateHelp = `a gate every wave must pass, repeatable: 'shadowAgreement>=0.98 [over 200] [tolerance 0.05]' (the wave runs in shadow first and switches once agreement holds over that many comparisons), 'errorRate<=0.02 [over N]', 'latency<=1.5 [over N]' (p95 and p99 against the previous version), 'drift<=0.2 [over N]'`

// parseGate reads one --gate expression: TYPE OP VALUE, then optional
// "over N" (the gate's minInferences) and, for shadowAgreement,
// "tolerance X".
func parseGate(expr string) (client.GateSpec, error) {
	bad := func(format string, a ...any) (client.GateSpec, error) {
		return client.GateSpec{}, fmt.Errorf("--gate %q: %s", expr, fmt.Sprintf(format, a...))
	}
	e := strings.TrimSpace(expr)
	i := strings.IndexAny(e, "<>")
	if i <= 0 || i+1 >= len(e) || e[i+1] != '=' {
		return bad("write TYPE>=VALUE or TYPE<=VALUE, e.g. shadowAgreement>=0.98 or errorRate<=0.02")
	}
	typ, op := strings.TrimSpace(e[:i]), e[i:i+2]
	words := strings.Fields(e[i+2:])
	if len(words) == 0 {
		return bad("no value after %s", op)
	}
	num := func(w string) (float64, bool) {
		v, err := strconv.ParseFloat(w, 64)
		return v, err == nil && !math.IsNaN(v) && !math.IsInf(v, 0) && v >= 0
	}
	val, ok := num(words[0])
	if !ok {
		return bad("%q is not a non-negative number", words[0])
	}
	g := client.GateSpec{Type: typ}
	want := "<="
	switch typ {
	case "shadowAgreement":
		want, g.Min = ">=", val
	case "errorRate", "drift":
		g.Max = val
	case "latency":
		g.MaxP95Ratio, g.MaxP99Ratio = val, val
	default:
		return bad("unknown gate type %q; use shadowAgreement, errorRate, latency or drift", typ)
	}
	if op != want {
		return bad("%s takes %s (a %s)", typ, want, map[string]string{">=": "floor", "<=": "ceiling"}[want])
	}
	for rest := words[1:]; len(rest) > 0; rest = rest[2:] {
		if len(rest) < 2 {
			return bad("%q wants a value after it", rest[0])
		}
		switch rest[0] {
		case "over":
			n, err := strconv.Atoi(rest[1])
			if err != nil || n < 1 {
				return bad("over %q: give the number of inferences (or comparisons) to judge on, e.g. over 200", rest[1])
			}
			g.MinInferences = n
		case "tolerance":
			v, ok := num(rest[1])
			if !ok || typ != "shadowAgreement" {
				return bad("tolerance %q: a non-negative number, for shadowAgreement only", rest[1])
			}
			g.Tolerance = v
		default:
			return bad("unknown word %q; after the value come 'over N' and (shadowAgreement) 'tolerance X'", rest[0])
		}
	}
	return g, nil
}

// withGates adds gates to the strategy of a specification (JSON).
func withGates(spec []byte, gates []client.GateSpec) ([]byte, error) {
	if len(gates) == 0 {
		return spec, nil
	}
	var doc map[string]any
	if err := json.Unmarshal(spec, &doc); err != nil {
		return nil, err
	}
	st, _ := doc["strategy"].(map[string]any)
	if st == nil {
		st = map[string]any{}
		doc["strategy"] = st
	}
	list, _ := st["gates"].([]any)
	for _, g := range gates {
		list = append(list, g)
	}
	st["gates"] = list
	return json.Marshal(doc)
}
