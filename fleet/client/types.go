package client

import "time"

// Device is one device as the controller sees it.
type Device struct {
	ID                 string            `json:"id"`
	Labels             map[string]string `json:"labels"`
	Online             bool              `json:"online"`
	LastSeen           *time.Time        `json:"lastSeen"`
	AgentVersion       string            `json:"agentVersion"`
	Health             string            `json:"health"`
	Slots              []Slot            `json:"slots"`
	Desired            *Desired          `json:"desired"`
	ReportedGeneration uint64            `json:"reportedGeneration"`
	SpoolDepth         uint64            `json:"spoolDepth"`
	Inferences         uint64            `json:"inferences"`
	InferenceErrors    uint64            `json:"inferenceErrors"`
	LastEvents         []Event           `json:"lastEvents"`
	// AgentUpdate is where the agent's self-update stands (nil from
	// agents without self-update).
	AgentUpdate *AgentUpdate `json:"agentUpdate,omitempty"`
}

// AgentUpdate is a device's report of its agent self-update.
type AgentUpdate struct {
	Running   string `json:"running"`
	Healthy   bool   `json:"healthy"`
	Pending   string `json:"pending"`
	Previous  string `json:"previous"`
	LastError string `json:"lastError"`
	RolloutID string `json:"rolloutId"`
}

// Active returns the model active in slot, or nil.
func (d *Device) Active(slot string) *ModelRef {
	for _, s := range d.Slots {
		if s.Slot == slot {
			return s.Active
		}
	}
	return nil
}

// Slot is what runs in one slot of a device.
type Slot struct {
	Slot        string     `json:"slot"`
	Active      *ModelRef  `json:"active"`
	Previous    *ModelRef  `json:"previous"`
	ActiveSince *time.Time `json:"activeSince"`
	Pending     *ModelRef  `json:"pending"`
	LastError   string     `json:"lastError"`
	// Shadow is the slot's shadow comparison under way or last finished
	// (nil: none).
	Shadow *Shadow `json:"shadow,omitempty"`
}

// Shadow is how a candidate run in shadow compared with the active
// version on the device.
type Shadow struct {
	Candidate *ModelRef `json:"candidate"`
	Compared  uint64    `json:"compared"`
	Agreed    uint64    `json:"agreed"`
	Errors    uint64    `json:"errors"`
	// Agreement is Agreed / Compared; nil before the first comparison.
	Agreement      *float64   `json:"agreement"`
	MaxScoreDiff   float64    `json:"maxScoreDiff"`
	MeanScoreDiff  float64    `json:"meanScoreDiff"`
	CandidateP99Us uint32     `json:"candidateP99Us"`
	ActiveP99Us    uint32     `json:"activeP99Us"`
	Since          *time.Time `json:"since"`
}

// ModelRef names a model version.
type ModelRef struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Digest  string `json:"digest"`
}

func (m *ModelRef) String() string {
	if m == nil {
		return "-"
	}
	return m.Name + "@" + m.Version
}

// Desired is the desired state the controller holds for a device.
type Desired struct {
	Generation uint64        `json:"generation"`
	Slots      []DesiredSlot `json:"slots"`
}

// DesiredSlot is one slot of a desired state.
type DesiredSlot struct {
	Slot    string `json:"slot"`
	Name    string `json:"name"`
	Version string `json:"version"`
	Digest  string `json:"digest"`
}

// Event is a deployment step a device reported.
type Event struct {
	Kind    string    `json:"kind"`
	Slot    string    `json:"slot"`
	Name    string    `json:"name"`
	Version string    `json:"version"`
	Detail  string    `json:"detail"`
	At      time.Time `json:"at"`
}

// Model is an uploaded model bundle.
type Model struct {
	Name      string     `json:"name"`
	Version   string     `json:"version"`
	Digest    string     `json:"digest"`
	Size      int64      `json:"size"`
	CreatedAt *time.Time `json:"createdAt,omitempty"`
}

// Assignment puts a model version into a slot of the devices a selector matches.
type Assignment struct {
	Model    string `json:"model"`
	Version  string `json:"version"`
	Slot     string `json:"slot,omitempty"`
	Selector string `json:"selector"`
}
