package rollout

import "fmt"

// Step is where one device stands in a rollout.
//
// Transitions (anything not listed does not happen; the engine checks with
// CanStep before every change):
//
//	pending      -> notified      the device's wave runs and a download slot is free: its desired
//	                              state (new version, rollout id, health policy) is committed and published
//	pending      -> skipped       the device is no longer in the inventory when its turn comes
//	notified     -> downloading   DOWNLOADING event for the rollout
//	notified     -> verified      VERIFIED event (the bundle was already on the device)
//	downloading  -> verified      VERIFIED event
//	notified,
//	downloading,
//	verified     -> activated     ACTIVATED event, or the reported state shows the new version active
//	activated    -> healthy       the reported state shows the new version active and healthy (the
//	                              agent's watch passed) and the soak window since activation is over:
//	                              the only way a device counts as succeeded
//	notified,
//	downloading,
//	verified     -> failed        REFUSED event for the generation issued, or FAILED event after which
//	                              the device gave up (nothing pending, new version not active)
//	activated    -> failed        FAILED event for the new version after its activation: it broke
//	                              its health bounds on a device that has nothing to go back to
//	activated,
//	healthy      -> rolled-back   ROLLED_BACK event, or the reported state shows another version
//	                              active: the agent switched back by itself (counts as a failure)
//	notified,
//	downloading,
//	verified,
//	activated    -> timed-out     the step's deadline passed while the device was online, or offline
//	                              under the unreachable policy fail (counts as a failure)
//	notified,
//	downloading,
//	verified,
//	activated    -> skipped       the deadline passed while the device was offline, policy skip
//	notified, downloading, verified, activated, healthy, failed, timed-out, skipped, rolled-back
//	             -> rolling-back  the rollout rolls back: a desired state restoring the previous
//	                              version (rollback=true) is committed and published (a device the
//	                              agent already switched back gets it too, so its desired state no
//	                              longer names the version that failed)
//	rolling-back -> rolled-back   the reported state shows the previous version active again
//	rolling-back -> timed-out     the deadline passed before the device confirmed; its retained desired
//	                              state still restores the previous version when it reconnects
//
// Under the unreachable policy wait, a passed deadline of an offline device
// changes nothing; the device gets a fresh deadline when it comes back.
//
// A device of a wave gated on shadowAgreement runs the new version in
// shadow while it stays notified, downloading or verified (shadow.go): its
// deadline does not count until it is sent the switch (with a fresh one);
// a passed deadline with the gate undecided pauses the rollout instead.
type Step int

// The steps.
const (
	StepPending Step = iota
	StepNotified
	StepDownloading
	StepVerified
	StepActivated
	StepHealthy
	StepFailed
	StepTimedOut
	StepSkipped
	StepRollingBack
	StepRolledBack
	numSteps
)

var stepNames = [numSteps]string{
	"pending", "notified", "downloading", "verified", "activated", "healthy",
	"failed", "timed-out", "skipped", "rolling-back", "rolled-back",
}

// Steps lists every step in order.
func Steps() []Step {
	out := make([]Step, numSteps)
	for i := range out {
		out[i] = Step(i)
	}
	return out
}

// String returns the step's name as the API shows it.
func (s Step) String() string {
	if s >= 0 && s < numSteps {
		return stepNames[s]
	}
	return fmt.Sprintf("Step(%d)", int(s))
}

// ParseStep reads a step's name.
func ParseStep(name string) (Step, error) {
	for i, n := range stepNames {
		if n == name {
			return Step(i), nil
		}
	}
	return 0, fmt.Errorf("unknown step %q", name)
}

// Terminal reports whether the device is done with its wave.
func (s Step) Terminal() bool {
	switch s {
	case StepHealthy, StepFailed, StepTimedOut, StepSkipped, StepRolledBack:
		return true
	}
	return false
}

// touched reports whether the rollout has sent the device a desired state.
func (s Step) touched() bool { return s != StepPending }

// inFlight reports whether the device holds one of the wave's download
// slots: told to update and not yet past verifying the bundle.
func (s Step) inFlight() bool { return s == StepNotified || s == StepDownloading }

// preActivation reports whether the device was told to update and has not
// activated the new version yet.
func (s Step) preActivation() bool {
	return s == StepNotified || s == StepDownloading || s == StepVerified
}

var stepTransitions = map[Step][]Step{
	StepPending:     {StepNotified, StepSkipped},
	StepNotified:    {StepDownloading, StepVerified, StepActivated, StepFailed, StepTimedOut, StepSkipped, StepRollingBack},
	StepDownloading: {StepVerified, StepActivated, StepFailed, StepTimedOut, StepSkipped, StepRollingBack},
	StepVerified:    {StepActivated, StepFailed, StepTimedOut, StepSkipped, StepRollingBack},
	StepActivated:   {StepHealthy, StepFailed, StepRolledBack, StepTimedOut, StepSkipped, StepRollingBack},
	StepHealthy:     {StepRolledBack, StepRollingBack},
	StepFailed:      {StepRollingBack},
	StepTimedOut:    {StepRollingBack},
	StepSkipped:     {StepRollingBack},
	StepRollingBack: {StepRolledBack, StepTimedOut},
	StepRolledBack:  {StepRollingBack},
}

// CanStep reports whether from -> to is one of the listed transitions.
func CanStep(from, to Step) bool {
	for _, s := range stepTransitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// Phase is where a whole rollout stands.
//
// Transitions:
//
//	(created)        -> running           the first wave needs no approval
//	(created)        -> waiting-approval  the first wave needs approval
//	running          -> waiting-approval  the next wave needs approval
//	waiting-approval -> running           approve
//	running,
//	waiting-approval -> paused            pause; or (running) a gate was inconclusive at the end of a wave
//	paused           -> running           resume (past the inconclusive gates, if that was the reason)
//	running          -> succeeded         the last wave passed; late joiners get the version now
//	running,
//	paused,
//	waiting-approval -> aborted           abort; or a failure with onFailure stop
//	running, paused,
//	waiting-approval,
//	aborted,
//	succeeded        -> rolling-back      rollback; or a failure (budget exceeded, gate failed) with
//	                                      onFailure rollback
//	rolling-back     -> rolled-back       every touched device is back on its previous version (or
//	                                      timed out confirming it)
type Phase string

// The phases.
const (
	PhaseRunning         Phase = "running"
	PhaseWaitingApproval Phase = "waiting-approval"
	PhasePaused          Phase = "paused"
	PhaseSucceeded       Phase = "succeeded"
	PhaseAborted         Phase = "aborted"
	PhaseRollingBack     Phase = "rolling-back"
	PhaseRolledBack      Phase = "rolled-back"
)

// Phases lists every phase.
func Phases() []Phase {
	return []Phase{PhaseRunning, PhaseWaitingApproval, PhasePaused, PhaseSucceeded, PhaseAborted, PhaseRollingBack, PhaseRolledBack}
}

// String returns the phase's name.
func (p Phase) String() string { return string(p) }

// Terminal reports whether the rollout will not change by itself any more.
func (p Phase) Terminal() bool {
	return p == PhaseSucceeded || p == PhaseAborted || p == PhaseRolledBack
}

// progressing reports whether the rollout may still advance or fail.
func (p Phase) progressing() bool {
	return p == PhaseRunning || p == PhasePaused || p == PhaseWaitingApproval
}

var phaseTransitions = map[Phase][]Phase{
	PhaseRunning:         {PhaseWaitingApproval, PhasePaused, PhaseSucceeded, PhaseAborted, PhaseRollingBack},
	PhaseWaitingApproval: {PhaseRunning, PhasePaused, PhaseAborted, PhaseRollingBack},
	PhasePaused:          {PhaseRunning, PhaseAborted, PhaseRollingBack},
	PhaseSucceeded:       {PhaseRollingBack},
	PhaseAborted:         {PhaseRollingBack},
	PhaseRollingBack:     {PhaseRolledBack},
	PhaseRolledBack:      {},
}

// CanPhase reports whether from -> to is one of the listed transitions.
func CanPhase(from, to Phase) bool {
	for _, p := range phaseTransitions[from] {
		if p == to {
			return true
		}
	}
	return false
}

// WaveState is where one wave stands.
//
//	pending -> waiting-approval -> running -> passed
//	pending -> running                     -> failed   (a gate failed, or the budget ran out during it)
//	                                running -> held     (gates inconclusive at its end; the rollout pauses)
//	                                held    -> running  (resume: the gates' doubt is overridden)
//	pending, waiting-approval, running, held -> stopped (the rollout was aborted or rolled back)
type WaveState string

// The wave states.
const (
	WavePending         WaveState = "pending"
	WaveWaitingApproval WaveState = "waiting-approval"
	WaveRunning         WaveState = "running"
	WaveHeld            WaveState = "held"
	WavePassed          WaveState = "passed"
	WaveFailed          WaveState = "failed"
	WaveStopped         WaveState = "stopped"
)

// done reports whether the wave will not change any more.
func (w WaveState) done() bool { return w == WavePassed || w == WaveFailed || w == WaveStopped }
