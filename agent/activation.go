package agent

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// HealthConfig is the health watch the agent applies to a newly activated
// version when its assignment's HealthPolicy leaves a field unset (YAML
// key health). Zero fields take deploy.DefaultHealthPolicy's values.
type HealthConfig struct {
	// Watch is how long the new version must stay within the bounds (1m).
	Watch time.Duration `yaml:"watch"`
	// MaxErrorRate is the ceiling on failed or timed-out calls (0.05).
	MaxErrorRate float64 `yaml:"max_error_rate"`
	// MaxLatencyP99 is the ceiling on the 99th percentile latency; 0 = none.
	MaxLatencyP99 time.Duration `yaml:"max_latency_p99"`
	// MinInferences is how many calls are needed to judge (20).
	MinInferences uint32 `yaml:"min_inferences"`
}

// ShadowConfig gives every new version a shadow phase before its switch
// (YAML key shadow, flag --shadow). A desired state that asks for one
// (SlotAssignment.shadow, as a rollout gated on shadowAgreement does)
// takes the fields it leaves unset from here when enabled (else from
// deploy.ShadowPolicy's defaults).
type ShadowConfig struct {
	Enabled bool `yaml:"enabled"`
	// MinInferences the candidate must answer beside the active version
	// before it is judged (100).
	MinInferences uint32 `yaml:"min_inferences"`
	// MaxDuration ends a phase short of traffic; the candidate is then
	// judged on what there is (10m).
	MaxDuration time.Duration `yaml:"max_duration"`
	// MinAgreement is the share of answers that must agree (0.98).
	MinAgreement float64 `yaml:"min_agreement"`
	// Tolerance is how far apart two non-class scores may be and agree,
	// relative to the active's (0.05).
	Tolerance float64 `yaml:"tolerance"`
}

func (h HealthConfig) validate() error {
	var errs []error
	if h.Watch < 0 || h.MaxLatencyP99 < 0 {
		errs = append(errs, errors.New("health: watch and max_latency_p99 must not be negative"))
	}
	if h.MaxErrorRate < 0 || h.MaxErrorRate > 1 {
		errs = append(errs, fmt.Errorf("health: max_error_rate %v is outside 0..1; use e.g. 0.05 for 5%%", h.MaxErrorRate))
	}
	return errors.Join(errs...)
}

func (s ShadowConfig) validate() error {
	var errs []error
	if s.MaxDuration < 0 {
		errs = append(errs, errors.New("shadow: max_duration must not be negative"))
	}
	if s.MinAgreement < 0 || s.MinAgreement > 1 {
		errs = append(errs, fmt.Errorf("shadow: min_agreement %v is outside 0..1; use e.g. 0.98", s.MinAgreement))
	}
	if s.Tolerance < 0 {
		errs = append(errs, fmt.Errorf("shadow: tolerance %v is negative", s.Tolerance))
	}
	return errors.Join(errs...)
}

func (h HealthConfig) policy() deploy.HealthPolicy {
	return deploy.HealthPolicy{Watch: h.Watch, MaxErrorRate: h.MaxErrorRate, MaxLatencyP99: h.MaxLatencyP99, MinInferences: h.MinInferences}
}

// hook is the deploy.Options.Shadow of this configuration: every
// assignment gets the same shadow phase (nil when disabled).
func (s ShadowConfig) hook() func(*pb.SlotAssignment) *deploy.ShadowPolicy {
	if !s.Enabled {
		return nil
	}
	p := deploy.ShadowPolicy{MinInferences: s.MinInferences, MaxDuration: s.MaxDuration, MinAgreement: s.MinAgreement, Tolerance: s.Tolerance}
	return func(*pb.SlotAssignment) *deploy.ShadowPolicy { q := p; return &q }
}

// writeActivationMetrics adds the health watch and shadow figures of
// every slot to /metrics, so an operator (or a scraper beside the device)
// sees a candidate's agreement before the controller can.
func (a *Agent) writeActivationMetrics(w io.Writer) {
	slots := a.mgr.Slots()
	fmt.Fprintf(w, "# HELP edgefleet_agent_slot_healthy 1 when the slot's active version passed its health watch.\n# TYPE edgefleet_agent_slot_healthy gauge\n")
	for _, s := range slots {
		v := 0
		if s.GetHealthy() {
			v = 1
		}
		fmt.Fprintf(w, "edgefleet_agent_slot_healthy{slot=%q,version=%q} %d\n", s.GetSlot(), s.GetActive().GetVersion(), v)
	}
	watches := a.mgr.Watches()
	names := slices.Sorted(maps.Keys(watches))
	fmt.Fprintf(w, "# HELP edgefleet_agent_watch_inferences Calls judged by the running health watch.\n# TYPE edgefleet_agent_watch_inferences gauge\n")
	for _, n := range names {
		fmt.Fprintf(w, "edgefleet_agent_watch_inferences{slot=%q} %d\n", n, watches[n].Inferences)
	}
	fmt.Fprintf(w, "# HELP edgefleet_agent_watch_errors Failed or timed-out calls in the running health watch.\n# TYPE edgefleet_agent_watch_errors gauge\n")
	for _, n := range names {
		fmt.Fprintf(w, "edgefleet_agent_watch_errors{slot=%q} %d\n", n, watches[n].Errors)
	}
	shadows := a.mgr.Shadows()
	names = slices.Sorted(maps.Keys(shadows))
	gauge := func(name, help string, v func(deploy.ShadowStats) any) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name)
		for _, n := range names {
			s := shadows[n]
			fmt.Fprintf(w, "%s{slot=%q,candidate=%q,active=%q} %v\n", name, n, s.Candidate.Version, s.Active.Version, v(s))
		}
	}
	gauge("edgefleet_agent_shadow_compared", "Calls the shadow candidate answered beside the active version.", func(s deploy.ShadowStats) any { return s.Compared })
	gauge("edgefleet_agent_shadow_agreement", "Share of compared calls whose answers agree.", func(s deploy.ShadowStats) any { return s.Agreement() })
	gauge("edgefleet_agent_shadow_errors", "Calls the candidate failed where the active version answered.", func(s deploy.ShadowStats) any { return s.Errors })
	gauge("edgefleet_agent_shadow_skipped", "Live calls not copied to the candidate: it was busy.", func(s deploy.ShadowStats) any { return s.Skipped })
	gauge("edgefleet_agent_shadow_max_score_diff", "Largest difference of an output value.", func(s deploy.ShadowStats) any { return s.MaxScoreDiff })
	gauge("edgefleet_agent_shadow_candidate_p99_seconds", "The candidate's 99th percentile latency.", func(s deploy.ShadowStats) any { return s.CandidateP99.Seconds() })
	gauge("edgefleet_agent_shadow_active_p99_seconds", "The active version's 99th percentile latency on the same calls.", func(s deploy.ShadowStats) any { return s.ActiveP99.Seconds() })
}
