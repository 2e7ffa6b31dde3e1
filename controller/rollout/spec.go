package rollout

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/selector"
	"github.com/edgefleet/edgefleet/proto/release"
)

// MaxSpecSize caps a rollout specification; a real one is a few hundred
// bytes.
const MaxSpecSize = 64 << 10

// MaxWaves caps the number of waves of a rollout.
const MaxWaves = 100

// ErrInvalid is wrapped by every error about a specification that cannot
// be accepted as written.
var ErrInvalid = errors.New("invalid rollout")

// Defaults of a specification's optional fields.
const (
	DefaultSlot          = "default"
	DefaultSoak          = 5 * time.Minute
	DefaultDeadline      = 30 * time.Minute
	DefaultMinInferences = 20
)

// Spec is a rollout's specification, as written in rollout.yaml or sent to
// POST /v1/rollouts (JSON, same field names):
//
//	name: grid-1-1-eu          # optional; also seeds the cohort hash
//	selector: region=eu,hw in (jetson,rpi5),!lab
//	model: grid-anomaly@1.1.0
//	slot: default
//	# or, instead of model and slot, an agent release (fleet agent release push):
//	# agent: 1.2.0
//	strategy:
//	  waves: [1%, 10%, {size: 50%, approval: true}, 100%]
//	  stratifyBy: site
//	  soak: 10m
//	  gates:
//	    - {type: errorRate, max: 0.02}
//	    - {type: latency, maxP99Ratio: 1.5}
//	  failureBudget: 2%
//	  maxConcurrentDownloads: 50
//	  deadline: 15m
//	  unreachable: skip
//	  health: {maxErrorRate: 0.05, maxLatencyP99: 250ms}
//
// Normalize fills in the defaults; the stored and displayed specification
// is the normalized one, so what a rollout does can be read off it.
type Spec struct {
	Name     string `json:"name,omitempty"`
	Selector string `json:"selector"`
	Model    string `json:"model,omitempty"`
	Slot     string `json:"slot,omitempty"`
	// Agent names an agent release version instead of a model: the agent
	// binary is updated with the same waves, gates, budget and controls.
	// The engine handles it as model release.Model in the pseudo slot
	// release.Slot (see agent.go).
	Agent    string   `json:"agent,omitempty"`
	Strategy Strategy `json:"strategy"`
}

// Strategy is how a rollout proceeds.
type Strategy struct {
	// Waves are cumulative: each size is where the rollout stands once
	// that wave is done ("1%, 10%, 50%, 100%"; "5, 50, 100%"). The last
	// wave always takes every remaining device, and every wave takes at
	// least one device more than the one before; a wave that would be
	// empty (a small fleet) is left out of the plan.
	Waves []WaveSpec `json:"waves"`
	// StratifyBy names a label; each wave then takes devices from every
	// value of it in proportion to its share of the targets.
	StratifyBy string `json:"stratifyBy,omitempty"`
	// Soak and Gates apply to every wave that does not set its own.
	Soak  *Duration  `json:"soak,omitempty"`
	Gates []GateSpec `json:"gates,omitempty"`
	// FailureBudget is how many devices may fail (a count, or a percent
	// of the targets) before the rollout stops; one more fails it.
	FailureBudget Size `json:"failureBudget,omitzero"`
	// MaxConcurrentDownloads caps the devices of a wave that are notified
	// or downloading at once; 0 means no cap.
	MaxConcurrentDownloads int `json:"maxConcurrentDownloads,omitempty"`
	// Deadline is how long a device may stay in one step.
	Deadline Duration `json:"deadline,omitzero"`
	// Unreachable is what a device that is offline when its deadline
	// passes counts as: fail (against the budget), skip (left out of the
	// wave) or wait (the wave waits for it).
	Unreachable string `json:"unreachable,omitempty"`
	// OnFailure is what a failed rollout does: rollback (restore the
	// previous version on every device it touched) or stop (keep them).
	OnFailure string `json:"onFailure,omitempty"`
	// Health bounds the new version on each device during its soak; the
	// agent switches back by itself when they are broken.
	Health *HealthSpec `json:"health,omitempty"`
}

// WaveSpec is one wave. In YAML or JSON it is either just its size ("10%",
// 25) or an object with the size and per-wave settings.
type WaveSpec struct {
	Size Size `json:"size"`
	// Soak is how long each device must stay healthy on the new version
	// before it counts as succeeded; gates are judged over it too.
	Soak *Duration `json:"soak,omitempty"`
	// Gates judge the wave's telemetry; absent (null) takes the
	// strategy's, [] means none.
	Gates []GateSpec `json:"gates"`
	// Approval holds the rollout before this wave until an operator
	// approves it.
	Approval bool `json:"approval,omitempty"`
}

// UnmarshalJSON accepts a size alone or the object form.
func (w *WaveSpec) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '{' {
		type plain WaveSpec
		var p plain
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			return err
		}
		*w = WaveSpec(p)
		return nil
	}
	*w = WaveSpec{}
	return w.Size.UnmarshalJSON(b)
}

// GateSpec configures one gate. Which fields apply depends on Type:
//
//	errorRate        max (fraction of inferences that fail or time out), minInferences
//	latency          maxP95Ratio and/or maxP99Ratio (new / previous version), minInferences
//	shadowAgreement  min (fraction of agreeing outputs), minInferences (comparisons summed over the
//	                 wave), tolerance (how far apart two non-class scores may be and agree, relative;
//	                 the agent's default 0.05): the wave runs in shadow first (shadow.go)
//	drift            max or maxDriftPSI (PSI of the outputs against the manifest's reference), minInferences
type GateSpec struct {
	Type          string  `json:"type"`
	Max           float64 `json:"max,omitempty"`
	Min           float64 `json:"min,omitempty"`
	MaxP95Ratio   float64 `json:"maxP95Ratio,omitempty"`
	MaxP99Ratio   float64 `json:"maxP99Ratio,omitempty"`
	MinInferences int     `json:"minInferences,omitempty"`
	// Tolerance is the shadowAgreement gate's score tolerance (relative).
	Tolerance float64 `json:"tolerance,omitempty"`
	// MaxDriftPSI is the drift gate's max by its other name.
	MaxDriftPSI float64 `json:"maxDriftPSI,omitempty"`
}

// HealthSpec bounds a new version on the device during its soak (sent to
// the agent as the slot's HealthPolicy).
type HealthSpec struct {
	MaxErrorRate  float64  `json:"maxErrorRate,omitempty"`
	MaxLatencyP99 Duration `json:"maxLatencyP99,omitzero"`
	MinInferences int      `json:"minInferences,omitempty"`
}

// Size is a device count or a percentage of a rollout's targets.
type Size struct {
	Count   int
	Percent float64
	// IsPercent tells the two apart (0% and 0 differ only in the text).
	IsPercent bool
}

// ParseSize reads "10%", "2.5%" or "25".
func ParseSize(s string) (Size, error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(s, "%"); ok {
		v, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || math.IsNaN(v) || v < 0 || v > 100 {
			return Size{}, fmt.Errorf("%q: use a percentage from 0%% to 100%%", s)
		}
		return Size{Percent: v, IsPercent: true}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return Size{}, fmt.Errorf("%q: use a device count (e.g. 5) or a percentage (e.g. 10%%)", s)
	}
	return Size{Count: n}, nil
}

// String writes the size as ParseSize reads it.
func (s Size) String() string {
	if s.IsPercent {
		return strconv.FormatFloat(s.Percent, 'f', -1, 64) + "%"
	}
	return strconv.Itoa(s.Count)
}

// Of returns the size as a count out of n devices, rounding a percentage
// up, capped at n.
func (s Size) Of(n int) int {
	if !s.IsPercent {
		return min(s.Count, n)
	}
	// A tiny epsilon keeps 10% of 200 at 20, not 21, despite binary floats.
	return min(int(math.Ceil(s.Percent*float64(n)/100-1e-9)), n)
}

// IsZero reports whether the size is the zero count.
func (s Size) IsZero() bool { return s == Size{} }

// MarshalJSON writes a count as a number and a percentage as a string.
func (s Size) MarshalJSON() ([]byte, error) {
	if s.IsPercent {
		return json.Marshal(s.String())
	}
	return json.Marshal(s.Count)
}

// UnmarshalJSON reads 25, "25" or "10%".
func (s *Size) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	var err error
	switch x := v.(type) {
	case string:
		*s, err = ParseSize(x)
	case float64:
		if x != math.Trunc(x) {
			return fmt.Errorf("%v: a device count must be a whole number; write a percentage as \"%v%%\"", x, x)
		}
		*s, err = ParseSize(strconv.FormatFloat(x, 'f', -1, 64))
	default:
		return fmt.Errorf("%s: want a device count or a percentage such as \"10%%\"", b)
	}
	return err
}

// Duration is a time.Duration written as "90s", "10m" or "1h30m".
type Duration time.Duration

// D returns the duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// IsZero reports whether the duration is zero.
func (d Duration) IsZero() bool { return d == 0 }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads "10m" (and a bare 0).
func (d *Duration) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch x := v.(type) {
	case string:
		p, err := time.ParseDuration(strings.TrimSpace(x))
		if err != nil || p < 0 {
			return fmt.Errorf("%q: want a duration such as 90s, 10m or 1h30m", x)
		}
		*d = Duration(p)
		return nil
	case float64:
		if x == 0 {
			*d = 0
			return nil
		}
	}
	return fmt.Errorf("%s: want a duration such as \"90s\", \"10m\" or \"1h30m\"", b)
}

// Unreachable policies.
const (
	UnreachableFail = "fail"
	UnreachableSkip = "skip"
	UnreachableWait = "wait"
)

// Failure policies.
const (
	OnFailureRollback = "rollback"
	OnFailureStop     = "stop"
)

// nameRE is what a rollout name (its id) may be: it is used in URLs, in
// desired states and in every event a device reports.
var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidName reports whether s can name a rollout.
func ValidName(s string) bool { return nameRE.MatchString(s) }

var slotRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ParseSpec decodes a JSON specification strictly (unknown fields are
// errors, so a misspelt setting is not silently ignored), then normalizes
// it with the built-in gate types. Every error wraps ErrInvalid and names
// the field.
func ParseSpec(data []byte) (Spec, error) { return ParseSpecKnown(data, nil) }

// ParseSpecKnown is ParseSpec with the gate types knownGate accepts (nil:
// the built-in ones), such as an engine's (Engine.KnownGate).
func ParseSpecKnown(data []byte, knownGate func(string) bool) (Spec, error) {
	if len(data) > MaxSpecSize {
		return Spec{}, fmt.Errorf("%w: specification is %d bytes; the limit is %d", ErrInvalid, len(data), MaxSpecSize)
	}
	var s Spec
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return Spec{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if dec.More() {
		return Spec{}, fmt.Errorf("%w: more than one JSON document", ErrInvalid)
	}
	if err := s.Normalize(knownGate); err != nil {
		return Spec{}, err
	}
	return s, nil
}

// ModelRef splits Model into name and version.
func (s *Spec) ModelRef() (name, version string) {
	if s.Agent != "" {
		return release.Model, s.Agent
	}
	name, version, _ = strings.Cut(s.Model, "@")
	return name, version
}

// Normalize checks the specification and fills in defaults. knownGate
// reports whether a gate type exists (nil: the built-in ones). Every error
// wraps ErrInvalid and names the field and what to write instead.
func (s *Spec) Normalize(knownGate func(string) bool) error {
	if knownGate == nil {
		knownGate = func(t string) bool { _, ok := builtinGates[t]; return ok }
	}
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	if s.Name != "" && !ValidName(s.Name) {
		return bad("name %q: use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit", s.Name)
	}
	if _, err := selector.Parse(s.Selector); err != nil {
		return bad("selector: %v", err)
	}
	if err := s.normalizeTarget(); err != nil {
		return err
	}
	st := &s.Strategy
	if len(st.Waves) == 0 {
		st.Waves = []WaveSpec{{Size: Size{Percent: 100, IsPercent: true}}}
	}
	if len(st.Waves) > MaxWaves {
		return bad("strategy.waves: %d waves; the limit is %d", len(st.Waves), MaxWaves)
	}
	if st.StratifyBy != "" {
		if _, err := selector.Parse(st.StratifyBy); err != nil || strings.ContainsAny(st.StratifyBy, "!=,() ") {
			return bad("strategy.stratifyBy %q: give one label key, e.g. site", st.StratifyBy)
		}
	}
	if st.Soak == nil {
		d := Duration(DefaultSoak)
		st.Soak = &d
	}
	if err := normalizeGates("strategy.gates", st.Gates, knownGate); err != nil {
		return err
	}
	for i := range st.Waves {
		w := &st.Waves[i]
		if w.Size.IsZero() || (w.Size.IsPercent && w.Size.Percent == 0) {
			return bad("strategy.waves[%d]: size %s: a wave takes at least one device", i, w.Size)
		}
		if i > 0 {
			prev := st.Waves[i-1].Size
			if prev.IsPercent == w.Size.IsPercent && ((prev.IsPercent && w.Size.Percent < prev.Percent) || (!prev.IsPercent && w.Size.Count < prev.Count)) {
				return bad("strategy.waves[%d]: size %s is below the wave before (%s); sizes are cumulative, e.g. 1%%, 10%%, 50%%, 100%%", i, w.Size, prev)
			}
		}
		if w.Soak == nil {
			d := *st.Soak
			w.Soak = &d
		}
		if w.Gates == nil {
			w.Gates = append([]GateSpec{}, st.Gates...)
		}
		if err := normalizeGates(fmt.Sprintf("strategy.waves[%d].gates", i), w.Gates, knownGate); err != nil {
			return err
		}
	}
	if st.FailureBudget.IsPercent && st.FailureBudget.Percent > 100 {
		return bad("strategy.failureBudget %s: at most 100%%", st.FailureBudget)
	}
	if st.MaxConcurrentDownloads < 0 {
		return bad("strategy.maxConcurrentDownloads %d: use 0 (no cap) or a positive count", st.MaxConcurrentDownloads)
	}
	if st.Deadline == 0 {
		st.Deadline = Duration(DefaultDeadline)
	}
	if st.Deadline.D() < time.Millisecond {
		return bad("strategy.deadline %s: too short to download anything", st.Deadline.D())
	}
	switch st.Unreachable {
	case "":
		st.Unreachable = UnreachableFail
	case UnreachableFail, UnreachableSkip, UnreachableWait:
	default:
		return bad("strategy.unreachable %q: choose fail, skip or wait", st.Unreachable)
	}
	switch st.OnFailure {
	case "":
		st.OnFailure = OnFailureRollback
	case OnFailureRollback, OnFailureStop:
	default:
		return bad("strategy.onFailure %q: choose rollback or stop", st.OnFailure)
	}
	if h := st.Health; h != nil {
		if h.MaxErrorRate < 0 || h.MaxErrorRate > 1 {
			return bad("strategy.health.maxErrorRate %v: a fraction from 0 to 1", h.MaxErrorRate)
		}
		if h.MinInferences < 0 {
			return bad("strategy.health.minInferences %d: must not be negative", h.MinInferences)
		}
	}
	return nil
}

func normalizeGates(field string, gates []GateSpec, known func(string) bool) error {
	for i := range gates {
		g := &gates[i]
		where := fmt.Sprintf("%s[%d]", field, i)
		if !known(g.Type) {
			return fmt.Errorf("%w: %s: unknown gate type %q; use errorRate, latency, shadowAgreement or drift", ErrInvalid, where, g.Type)
		}
		if g.MinInferences < 0 {
			return fmt.Errorf("%w: %s.minInferences %d: must not be negative", ErrInvalid, where, g.MinInferences)
		}
		if g.MinInferences == 0 {
			g.MinInferences = DefaultMinInferences
		}
		switch g.Type {
		case GateErrorRate:
			if g.Max < 0 || g.Max > 1 {
				return fmt.Errorf("%w: %s.max %v: the error rate ceiling is a fraction from 0 to 1 (0.02 = 2%%)", ErrInvalid, where, g.Max)
			}
		case GateLatency:
			if g.MaxP95Ratio == 0 && g.MaxP99Ratio == 0 {
				return fmt.Errorf("%w: %s: set maxP95Ratio and/or maxP99Ratio (e.g. 1.5 = at most 50%% slower than the previous version)", ErrInvalid, where)
			}
			if g.MaxP95Ratio < 0 || g.MaxP99Ratio < 0 {
				return fmt.Errorf("%w: %s: latency ratios must be positive", ErrInvalid, where)
			}
		case GateShadowAgreement:
			if g.Min <= 0 || g.Min > 1 {
				return fmt.Errorf("%w: %s.min %v: the agreement floor is a fraction from 0 to 1", ErrInvalid, where, g.Min)
			}
			if g.Tolerance < 0 || math.IsNaN(g.Tolerance) || math.IsInf(g.Tolerance, 0) {
				return fmt.Errorf("%w: %s.tolerance %v: a relative score difference, e.g. 0.05, or leave it out for the agent's default", ErrInvalid, where, g.Tolerance)
			}
		case GateDrift:
			if g.Max == 0 {
				g.Max = g.MaxDriftPSI
			}
			if g.Max <= 0 {
				return fmt.Errorf("%w: %s.max %v: set the highest drift score allowed", ErrInvalid, where, g.Max)
			}
		}
	}
	return nil
}

// Budget returns the failure budget as a count out of n targets.
func (s *Spec) Budget(n int) int {
	b := s.Strategy.FailureBudget
	if b.IsPercent {
		// Rounded down: a 5% budget of 30 devices allows 1 failure, not 2.
		return int(math.Floor(b.Percent*float64(n)/100 + 1e-9))
	}
	return b.Count
}
