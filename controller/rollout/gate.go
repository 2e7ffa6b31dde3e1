package rollout

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
)

// Result is a gate's answer.
type Result string

// The answers. A failed gate stops the rollout (and rolls it back, by
// default); an inconclusive one at the end of a wave pauses it for an
// operator to look.
const (
	Pass         Result = "pass"
	Fail         Result = "fail"
	Inconclusive Result = "inconclusive"
)

// Figure is one number a gate judged, for people to read.
type Figure struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	// Limit is the bound Value was held to, when there is one.
	Limit *float64 `json:"limit,omitempty"`
	Unit  string   `json:"unit,omitempty"`
}

// Verdict is a gate's answer with its reasons.
type Verdict struct {
	Gate   string `json:"gate"`
	Result Result `json:"result"`
	// Detail says in one line what was measured against what.
	Detail  string   `json:"detail"`
	Figures []Figure `json:"figures,omitempty"`
	At      string   `json:"at,omitempty"`
	// Wait, on an Inconclusive verdict, is when the data the gate lacks
	// is due (the latency gate's first minute after activation): at the
	// end of a wave the engine asks again until then instead of pausing
	// at once. Zero: asking again will not help.
	Wait time.Time `json:"-"`
}

// Gate judges a wave from its telemetry. Evaluate runs on the engine's
// goroutine while the wave soaks (only a Fail acts then) and once at the
// end of the wave (every answer acts); it must be quick and must not keep
// in.
//
// Gates are hooks: embed GateBase and override Evaluate. The shadow
// agreement and drift gates are such hooks, waiting for the runtime and
// telemetry work to give them data (see ShadowSource, DriftSource).
type Gate interface {
	// Name is the gate's type as written in a specification.
	Name() string
	Evaluate(ctx context.Context, in *GateInput) Verdict
}

// GateBase is the base of every gate: it answers Inconclusive, so a gate
// that has no data yet pauses a rollout instead of waving it through.
type GateBase struct {
	// Type is what Name returns.
	Type string
}

// Name returns b.Type.
func (b GateBase) Name() string { return b.Type }

// Evaluate answers Inconclusive.
func (b GateBase) Evaluate(context.Context, *GateInput) Verdict {
	return Verdict{Gate: b.Type, Result: Inconclusive, Detail: "this controller has no data for the " + b.Type + " gate yet"}
}

// GateFactory makes a gate from its specification.
type GateFactory func(spec GateSpec) (Gate, error)

// The built-in gate types.
const (
	GateErrorRate       = "errorRate"
	GateLatency         = "latency"
	GateShadowAgreement = "shadowAgreement"
	GateDrift           = "drift"
)

var builtinGates = map[string]GateFactory{
	GateErrorRate: func(s GateSpec) (Gate, error) { return &ErrorRateGate{Max: s.Max, MinInferences: s.MinInferences}, nil },
	GateLatency: func(s GateSpec) (Gate, error) {
		return &LatencyGate{MaxP95Ratio: s.MaxP95Ratio, MaxP99Ratio: s.MaxP99Ratio, MinInferences: s.MinInferences}, nil
	},
	GateShadowAgreement: func(s GateSpec) (Gate, error) {
		return &ShadowAgreementGate{Min: s.Min, MinInferences: s.MinInferences}, nil
	},
	GateDrift: func(s GateSpec) (Gate, error) { return &DriftGate{Max: s.Max, MinInferences: s.MinInferences}, nil },
}

// Telemetry is where gates read inference outcomes; *store.Store is one.
type Telemetry interface {
	InferenceSamples(ctx context.Context, model, version string, since, until time.Time, limit int) ([]store.InferenceSample, error)
	// Minutes and InstallSpans feed the latency comparison (baseline.go).
	Minutes(ctx context.Context, q store.MinuteQuery) ([]store.Minute, error)
	InstallSpans(ctx context.Context, ids []string, since, until time.Time) (map[string][]store.InstallSpan, error)
}

// MaxSamples bounds the inference records one gate evaluation reads per
// version: the newest ones are the ones that matter.
const MaxSamples = 200_000

// GateInput is what a gate judges: a wave of a rollout over a window of
// time. Its sample methods read the store once and share the result
// between the gates of one evaluation.
type GateInput struct {
	RolloutID string
	Wave      int
	Model     string
	Version   string
	// Previous are the versions the wave's devices ran before, the most
	// common first: the baseline latency is theirs.
	Previous []string
	// Devices are the wave's devices that activated the new version.
	Devices map[string]bool
	// Activated is when each of Devices activated the new version.
	Activated map[string]time.Time
	// Control is the rollout's cohort outside this wave that runs one of
	// Previous now, with the time each device activated it: the latency
	// gate's baseline runs concurrently with the wave (baseline.go).
	Control map[string]time.Time
	// Since and Until bound the wave's window: from its start to now.
	Since, Until time.Time
	// BaselineSince is how far back before the wave the latency gate's
	// fallback baseline (the wave's own devices before they updated) may
	// reach, when no device outside the wave gives a concurrent one.
	BaselineSince time.Time
	// Final is set for the evaluation at the end of the wave.
	Final bool

	telemetry Telemetry
	once      sync.Once
	wave      Samples
	err       error
	latOnce   sync.Once
	lat       LatencyComparison
	latErr    error
}

// Samples are inference outcomes summed up.
type Samples struct {
	N        int
	Errors   int
	Timeouts int
	// Latencies are sorted, microseconds, of the successful inferences.
	Latencies []uint32
}

// ErrorRate is the fraction of inferences that failed or timed out.
func (s Samples) ErrorRate() float64 {
	if s.N == 0 {
		return 0
	}
	return float64(s.Errors) / float64(s.N)
}

// Quantile returns the q-quantile of the latencies (nearest rank).
func (s Samples) Quantile(q float64) time.Duration {
	if len(s.Latencies) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(s.Latencies)))) - 1
	i = min(max(i, 0), len(s.Latencies)-1)
	return time.Duration(s.Latencies[i]) * time.Microsecond
}

// isTimeout tells timeouts from other errors in a stored error text; the
// agent's runtime says "timed out" (models/host.ErrTimeout).
func isTimeout(e string) bool {
	e = strings.ToLower(e)
	return strings.Contains(e, "timed out") || strings.Contains(e, "deadline exceeded") || strings.Contains(e, "timeout")
}

func summarize(recs []store.InferenceSample, keep func(string) bool) Samples {
	var s Samples
	for _, r := range recs {
		if !keep(r.DeviceID) {
			continue
		}
		s.N++
		if r.Error != "" {
			s.Errors++
			if isTimeout(r.Error) {
				s.Timeouts++
			}
			continue
		}
		s.Latencies = append(s.Latencies, r.LatencyUS)
	}
	slices.Sort(s.Latencies)
	return s
}

func (in *GateInput) load(ctx context.Context) {
	in.once.Do(func() {
		if in.telemetry == nil {
			return
		}
		recs, err := in.telemetry.InferenceSamples(ctx, in.Model, in.Version, in.Since, in.Until, MaxSamples)
		if err != nil {
			in.err = err
			return
		}
		in.wave = summarize(recs, func(id string) bool { return in.Devices[id] })
	})
}

// WaveSamples returns the new version's inferences on the wave's devices
// within the wave's window, every minute of it: an error in the minute a
// device switched is still an error of the new version.
func (in *GateInput) WaveSamples(ctx context.Context) (Samples, error) {
	in.load(ctx)
	return in.wave, in.err
}

// Latency returns the new version's latencies and the baseline they are
// judged against, over matching minutes with install and activation
// minutes left out (baseline.go).
func (in *GateInput) Latency(ctx context.Context) (LatencyComparison, error) {
	in.latOnce.Do(func() {
		if in.telemetry == nil {
			return
		}
		in.lat, in.latErr = compareLatency(ctx, in)
	})
	return in.lat, in.latErr
}

func limit(v float64) *float64 { return &v }

func pct(v float64) string { return fmt.Sprintf("%.2f%%", v*100) }

func msec(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond)) }

// ErrorRateGate holds the share of inferences that fail or time out on the
// new version under an absolute ceiling.
type ErrorRateGate struct {
	GateBase
	Max           float64
	MinInferences int
}

// Name returns "errorRate".
func (g *ErrorRateGate) Name() string { return GateErrorRate }

// Evaluate judges the wave's error and timeout rate.
func (g *ErrorRateGate) Evaluate(ctx context.Context, in *GateInput) Verdict {
	v := Verdict{Gate: GateErrorRate}
	s, err := in.WaveSamples(ctx)
	if err != nil {
		v.Result, v.Detail = Inconclusive, "cannot read telemetry: "+err.Error()
		return v
	}
	v.Figures = []Figure{
		{Name: "inferences", Value: float64(s.N), Limit: limit(float64(g.MinInferences)), Unit: "min"},
		{Name: "errors", Value: float64(s.Errors - s.Timeouts)},
		{Name: "timeouts", Value: float64(s.Timeouts)},
		{Name: "errorRate", Value: s.ErrorRate(), Limit: limit(g.Max), Unit: "fraction"},
	}
	switch {
	case s.N < g.MinInferences:
		v.Result = Inconclusive
		v.Detail = fmt.Sprintf("%d inferences on %s from the wave's devices; need %d to judge the error rate", s.N, in.Version, g.MinInferences)
	case s.ErrorRate() > g.Max:
		v.Result = Fail
		v.Detail = fmt.Sprintf("error rate %s (%d errors, %d timeouts in %d inferences) is above the ceiling %s", pct(s.ErrorRate()), s.Errors-s.Timeouts, s.Timeouts, s.N, pct(g.Max))
	default:
		v.Result = Pass
		v.Detail = fmt.Sprintf("error rate %s (%d errors, %d timeouts in %d inferences), ceiling %s", pct(s.ErrorRate()), s.Errors-s.Timeouts, s.Timeouts, s.N, pct(g.Max))
	}
	return v
}

// LatencyGate compares the new version's latency percentiles with those of
// the previous version over the same minutes: on the rollout's devices
// outside the wave (the control cohort), or, when none ran it then, on
// the wave's own devices before they updated (baseline.go).
type LatencyGate struct {
	GateBase
	// MaxP95Ratio and MaxP99Ratio bound new/previous; 0 skips that one.
	MaxP95Ratio, MaxP99Ratio float64
	MinInferences            int
}

// Name returns "latency".
func (g *LatencyGate) Name() string { return GateLatency }

// Evaluate judges the wave's latency regression.
func (g *LatencyGate) Evaluate(ctx context.Context, in *GateInput) Verdict {
	c, err := in.Latency(ctx)
	if err != nil {
		return Verdict{Gate: GateLatency, Result: Inconclusive, Detail: "cannot read telemetry: " + err.Error()}
	}
	return g.judge(in, c)
}

// minTail is how many samples the latency gate wants beyond a quantile
// before it reads it, while more are due (LatencyComparison.Settled).
const minTail = 20.0

func (g *LatencyGate) judge(in *GateInput, c LatencyComparison) Verdict {
	v := Verdict{Gate: GateLatency}
	prev := strings.Join(in.Previous, ",")
	if prev == "" {
		prev = "the previous version"
	}
	nw, nb := c.Candidate.N(), c.Baseline.N()
	v.Figures = []Figure{
		{Name: "samples", Value: float64(nw), Limit: limit(float64(g.MinInferences)), Unit: "min"},
		{Name: "baselineSamples", Value: float64(nb), Limit: limit(float64(g.MinInferences)), Unit: "min"},
		{Name: "baselineDevices", Value: float64(c.BaselineDevices)},
		{Name: "minutes", Value: float64(c.Minutes)},
	}
	need := max(g.MinInferences, 1)
	switch {
	case nw < need:
		v.Result, v.Wait = Inconclusive, c.Settled
		v.Detail = fmt.Sprintf("insufficient data: %d latency samples of %s on %d of the wave's devices, counting only minutes after the one each activated in; need %d",
			nw, in.Version, c.CandidateDevices, need)
		return v
	case nb < need:
		v.Result = Inconclusive
		switch {
		case len(in.Previous) == 0:
			v.Detail = fmt.Sprintf("insufficient baseline: the wave's devices ran no earlier version of %s to compare %s with", in.Model, in.Version)
		case c.Concurrent:
			v.Wait = c.Settled
			v.Detail = fmt.Sprintf("insufficient baseline: %d latency samples of %s on %d devices outside the wave in the same %d minutes; need %d",
				nb, prev, c.BaselineDevices, c.Minutes, need)
		default:
			outside := "no device outside the wave runs " + prev
			if c.ControlDevices > 0 {
				v.Wait = c.Settled // the control cohort may still report
				outside = fmt.Sprintf("none of the %d devices outside the wave on %s reported in the same %d minutes", c.ControlDevices, prev, c.Minutes)
			}
			v.Detail = fmt.Sprintf("insufficient baseline: %s, and the wave's own devices have %d latency samples of it in the %s before the wave; need %d",
				outside, nb, in.Since.Sub(in.BaselineSince).Round(time.Minute), need)
		}
		return v
	}
	quantiles := []struct {
		name string
		q    float64
		max  float64
	}{{"p95", 0.95, g.MaxP95Ratio}, {"p99", 0.99, g.MaxP99Ratio}}
	// A quantile of a few samples is a handful of the slowest calls: on a
	// busy device, scheduling noise. While the window still grows, wait
	// until minTail samples lie beyond each quantile judged; once it is
	// settled, MinInferences is the floor.
	if in.Until.Before(c.Settled) {
		want, name := 0, ""
		for _, p := range quantiles {
			if n := int(math.Ceil(minTail / (1 - p.q))); p.max > 0 && n > want {
				want, name = n, p.name
			}
		}
		if nw < want || nb < want {
			v.Result, v.Wait = Inconclusive, c.Settled
			v.Detail = fmt.Sprintf("collecting: %d latency samples of %s and %d of %s so far; judging at %d of each (%d beyond the %s), or at %s with at least %d",
				nw, in.Version, nb, prev, want, int(minTail), name, c.Settled.UTC().Format(time.TimeOnly), need)
			return v
		}
	}
	v.Result = Pass
	var parts []string
	for _, p := range quantiles {
		if p.max == 0 {
			continue
		}
		nw, old := c.Candidate.Quantile(p.q), c.Baseline.Quantile(p.q)
		ratio := float64(nw) / float64(max(old, time.Microsecond))
		v.Figures = append(v.Figures,
			Figure{Name: p.name, Value: float64(nw) / float64(time.Millisecond), Unit: "ms"},
			Figure{Name: p.name + "Baseline", Value: float64(old) / float64(time.Millisecond), Unit: "ms"},
			Figure{Name: p.name + "Ratio", Value: ratio, Limit: limit(p.max)})
		mark := ""
		if ratio > p.max {
			v.Result = Fail
			mark = " ABOVE LIMIT"
		}
		parts = append(parts, fmt.Sprintf("%s %s on %s vs %s on %s: x%.2f (limit x%.2f)%s", p.name, msec(nw), in.Version, msec(old), prev, ratio, p.max, mark))
	}
	if c.Concurrent {
		parts = append(parts, fmt.Sprintf("%d samples on %d devices vs %d on %d devices outside the wave, same %d minutes", nw, c.CandidateDevices, nb, c.BaselineDevices, c.Minutes))
	} else {
		parts = append(parts, fmt.Sprintf("%d samples on %d devices vs %d on the same devices before the wave (fallback: no device outside the wave ran %s in the same minutes)", nw, c.CandidateDevices, nb, prev))
	}
	v.Detail = strings.Join(parts, "; ")
	return v
}

// ShadowSource reports how often a new version's outputs agreed with the
// current model's when run side by side on the same inputs. The engine's
// own reads the figures the wave's devices report (shadow.go).
type ShadowSource interface {
	ShadowAgreement(ctx context.Context, in *GateInput) (agreed, compared int, err error)
}

// ShadowAgreementGate holds the share of agreeing outputs above a floor.
// Without a Source it is Inconclusive.
type ShadowAgreementGate struct {
	GateBase
	Min           float64
	MinInferences int
	Source        ShadowSource
}

// Name returns "shadowAgreement".
func (g *ShadowAgreementGate) Name() string { return GateShadowAgreement }

// Evaluate judges the agreement.
func (g *ShadowAgreementGate) Evaluate(ctx context.Context, in *GateInput) Verdict {
	if g.Source == nil {
		return GateBase{Type: GateShadowAgreement}.Evaluate(ctx, in)
	}
	v := Verdict{Gate: GateShadowAgreement}
	agreed, n, err := g.Source.ShadowAgreement(ctx, in)
	if err != nil {
		v.Result, v.Detail = Inconclusive, err.Error()
		return v
	}
	rate := 0.0
	if n > 0 {
		rate = float64(agreed) / float64(n)
	}
	v.Figures = []Figure{{Name: "compared", Value: float64(n)}, {Name: "agreement", Value: rate, Limit: limit(g.Min), Unit: "fraction"}}
	switch {
	case n < g.MinInferences:
		v.Result, v.Detail = Inconclusive, fmt.Sprintf("%d shadow comparisons; need %d", n, g.MinInferences)
	case rate < g.Min:
		v.Result, v.Detail = Fail, fmt.Sprintf("agreement %s in %d comparisons is below the floor %s", pct(rate), n, pct(g.Min))
	default:
		v.Result, v.Detail = Pass, fmt.Sprintf("agreement %s in %d comparisons, floor %s", pct(rate), n, pct(g.Min))
	}
	return v
}

// DriftSource reports how far the new version's output distribution moved
// from its reference (PSI or JS on the manifest's bins). The telemetry
// work fills it in.
type DriftSource interface {
	Drift(ctx context.Context, in *GateInput) (score float64, n int, err error)
}

// DriftGate holds the output drift under a ceiling. Without a Source it is
// Inconclusive.
type DriftGate struct {
	GateBase
	Max           float64
	MinInferences int
	Source        DriftSource
}

// Name returns "drift".
func (g *DriftGate) Name() string { return GateDrift }

// Evaluate judges the drift.
func (g *DriftGate) Evaluate(ctx context.Context, in *GateInput) Verdict {
	if g.Source == nil {
		return GateBase{Type: GateDrift}.Evaluate(ctx, in)
	}
	v := Verdict{Gate: GateDrift}
	score, n, err := g.Source.Drift(ctx, in)
	if err != nil {
		v.Result, v.Detail = Inconclusive, err.Error()
		return v
	}
	v.Figures = []Figure{{Name: "outputs", Value: float64(n)}, {Name: "drift", Value: score, Limit: limit(g.Max)}}
	switch {
	case n < g.MinInferences:
		v.Result, v.Detail = Inconclusive, fmt.Sprintf("%d outputs; need %d to judge drift", n, g.MinInferences)
	case score > g.Max:
		v.Result, v.Detail = Fail, fmt.Sprintf("drift %.3f over %d outputs is above %.3f", score, n, g.Max)
	default:
		v.Result, v.Detail = Pass, fmt.Sprintf("drift %.3f over %d outputs, limit %.3f", score, n, g.Max)
	}
	return v
}
