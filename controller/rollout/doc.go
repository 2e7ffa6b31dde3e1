// Package rollout runs staged rollouts: a model version goes to the
// devices a label selector matches, wave after wave, and a device counts
// as done only when it reports the new version active and healthy through
// its soak window, never when it merely acknowledges a download.
//
// # Specification and plan
//
// A Spec (spec.go) names the selector, model@version and slot, and a
// Strategy: cumulative waves by count or percent, an optional label to
// stratify by, per-wave soak, gates and approval, a failure budget, a cap
// on concurrent downloads, a deadline per device step and what an
// unreachable device counts as (fail, skip, wait). MakePlan (plan.go)
// orders the targets by a hash of (rollout name, device) and cuts the
// waves, so the same rollout planned twice has the same waves, and each
// wave covers every stratum in proportion.
//
// # State machines
//
// The rollout's Phase, each wave's WaveState and each device's Step are
// written down, with every transition, in step.go. Device steps move on
// what devices report: their events (DOWNLOADING, VERIFIED, ACTIVATED,
// HEALTHY, FAILED, ROLLED_BACK, REFUSED) and their retained state, which
// is the truth when events are lost; and on time: soak ends and deadlines.
//
// # Gates
//
// Gates (gate.go) are hooks: a Gate interface, a GateBase to embed, and
// GateFactory by type name. The built-in errorRate gate reads the stored
// per-minute aggregates of the wave's devices; the latency gate compares
// them with the previous version over the same minutes, on the rollout's
// devices outside the wave, leaving out minutes in which a device was
// installing or activating (baseline.go); shadowAgreement and drift read
// a ShadowSource and a DriftSource. A wave gated on shadowAgreement runs
// in shadow first and switches its devices only once the gate passes
// (shadow.go). A failing gate stops the rollout at once; gates that
// cannot decide at the end of a wave pause it until an operator resumes,
// unless the data they lack is due (Verdict.Wait: the latency gate's
// first minute after the activations), in which case the engine asks
// them again until then.
//
// # One decider, persistence before action
//
// The Engine (engine.go) owns every open rollout on one goroutine (Run):
// device news, timers and operator actions (Create, Act) are applied there
// one at a time, so two decisions never race. Each decision (decide.go)
// changes the rollout in memory, then commits everything it changed, the
// desired states it issues included, in one store transaction
// (store.CommitRollout, under the director's publish lock), and only then
// publishes those desired states. A controller killed at any moment
// restarts with every rollout as last committed: it reloads the open ones,
// re-reads what their devices reported and replays their events, and
// carries on; nothing is sent to a device that its committed step does
// not call for, and desired states committed but not yet published go out
// when the broker link comes up.
//
// Reads (Status, List, Devices) go to the store, which holds exactly what
// was decided, and Subscribe tells watchers (the API's event stream) when
// a rollout changed.
package rollout
