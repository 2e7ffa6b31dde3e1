package api

import (
	"time"

	"github.com/edgefleet/edgefleet/controller/inventory"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// The JSON documents of the API. Field names are part of the contract with
// the fleet CLI and users' scripts: add fields freely, never rename one.

// ModelRef names a model version and its bundle.
type ModelRef struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Digest  string `json:"digest"`
}

// Slot is what a device reports for one slot.
type Slot struct {
	Slot        string    `json:"slot"`
	Active      *ModelRef `json:"active"`
	Previous    *ModelRef `json:"previous"`
	ActiveSince *string   `json:"activeSince"`
	Pending     *ModelRef `json:"pending"`
	LastError   string    `json:"lastError"`
	// Healthy is set once the active version passed the agent's health
	// watch.
	Healthy bool `json:"healthy"`
	// RolloutID names the rollout that put the active version there.
	RolloutID string `json:"rolloutId"`
	// Shadow is the shadow comparison under way in this slot, or the last
	// one finished there; absent when the slot has had none.
	Shadow *Shadow `json:"shadow,omitempty"`
}

// Shadow is how a candidate version, run in shadow beside the active one,
// compared with it on the device (the agent's SlotState.shadow).
type Shadow struct {
	Candidate *ModelRef `json:"candidate"`
	// Compared counts the inferences both answered; Agreed those whose
	// answers agreed within the policy's tolerance; Errors the candidate's
	// failures.
	Compared uint64 `json:"compared"`
	Agreed   uint64 `json:"agreed"`
	Errors   uint64 `json:"errors"`
	// Agreement is Agreed / Compared; null before the first comparison.
	Agreement *float64 `json:"agreement"`
	// MaxScoreDiff and MeanScoreDiff are the largest and mean absolute
	// differences between the two versions' output elements.
	MaxScoreDiff  float64 `json:"maxScoreDiff"`
	MeanScoreDiff float64 `json:"meanScoreDiff"`
	// CandidateP99Us and ActiveP99Us are the two versions' p99 latencies
	// over the comparison, in microseconds.
	CandidateP99Us uint32  `json:"candidateP99Us"`
	ActiveP99Us    uint32  `json:"activeP99Us"`
	Since          *string `json:"since"`
}

// shadowJSON is the API view of a reported shadow comparison (nil: none).
func shadowJSON(s *pb.ShadowState) *Shadow {
	if s == nil {
		return nil
	}
	out := &Shadow{Candidate: modelRef(s.GetCandidate()), Compared: s.GetCompared(), Agreed: s.GetAgreed(), Errors: s.GetErrors(),
		MaxScoreDiff: s.GetMaxScoreDiff(), MeanScoreDiff: s.GetMeanScoreDiff(),
		CandidateP99Us: s.GetCandidateP99Us(), ActiveP99Us: s.GetActiveP99Us()}
	if s.GetCompared() > 0 {
		a := float64(s.GetAgreed()) / float64(s.GetCompared())
		out.Agreement = &a
	}
	if ms := s.GetSinceUnixMs(); ms > 0 {
		out.Since = optTime(time.UnixMilli(ms))
	}
	return out
}

// DesiredSlot is what the controller wants in one slot.
type DesiredSlot struct {
	Slot    string `json:"slot"`
	Name    string `json:"name"`
	Version string `json:"version"`
	Digest  string `json:"digest"`
	// RolloutID names the rollout that set the slot, "" for an assignment.
	RolloutID string `json:"rolloutId"`
	// Rollback is set when the slot deliberately restores an older version.
	Rollback bool `json:"rollback"`
}

// Desired is a device's desired state.
type Desired struct {
	Generation uint64        `json:"generation"`
	Slots      []DesiredSlot `json:"slots"`
}

// Event is a deployment step a device reported.
type Event struct {
	Kind    string `json:"kind"`
	Slot    string `json:"slot"`
	Name    string `json:"name"`
	Version string `json:"version"`
	Detail  string `json:"detail"`
	At      string `json:"at"`
}

// Device is the API's view of one device.
type Device struct {
	ID                 string            `json:"id"`
	Labels             map[string]string `json:"labels"`
	Online             bool              `json:"online"`
	LastSeen           *string           `json:"lastSeen"`
	AgentVersion       string            `json:"agentVersion"`
	OS                 string            `json:"os"`
	Arch               string            `json:"arch"`
	Health             string            `json:"health"`
	Slots              []Slot            `json:"slots"`
	Desired            *Desired          `json:"desired"`
	ReportedGeneration uint64            `json:"reportedGeneration"`
	SpoolDepth         uint64            `json:"spoolDepth"`
	Inferences         int64             `json:"inferences"`
	InferenceErrors    int64             `json:"inferenceErrors"`
	LastEvents         []Event           `json:"lastEvents"`
	// AgentUpdate is where the agent's self-update stands; absent from
	// agents without self-update.
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

// DeviceList is the body of GET /v1/devices.
type DeviceList struct {
	Devices []Device `json:"devices"`
}

// Model is a stored model version.
type Model struct {
	Name      string `json:"name"`
	Version   string `json:"version"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	CreatedAt string `json:"createdAt"`
}

// ModelList is the body of GET /v1/models.
type ModelList struct {
	Models []Model `json:"models"`
}

// AssignmentRequest is the body of POST /v1/assignments.
type AssignmentRequest struct {
	Model    string `json:"model"`
	Version  string `json:"version"`
	Slot     string `json:"slot"`
	Selector string `json:"selector"`
}

// AssignmentResponse is the answer to POST /v1/assignments.
type AssignmentResponse struct {
	// Devices are the devices whose desired state now names the model.
	Devices []string `json:"devices"`
	// Unpublished lists devices whose new desired state the broker has not
	// acknowledged yet; it is stored and sent again after a reconnect.
	Unpublished []string `json:"unpublished,omitempty"`
}

// Error is the body of every error response.
type Error struct {
	Error string `json:"error"`
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// optTime is nil (JSON null) for the zero time: clients decode these
// fields into *time.Time, which "" would break.
func optTime(t time.Time) *string {
	if t.IsZero() {
		return nil
	}
	s := rfc3339(t)
	return &s
}

func modelRef(m *pb.ModelRef) *ModelRef {
	if m == nil || (m.GetName() == "" && m.GetVersion() == "" && m.GetBundleSha256() == "") {
		return nil
	}
	return &ModelRef{Name: m.GetName(), Version: m.GetVersion(), Digest: m.GetBundleSha256()}
}

func modelJSON(m store.Model) Model {
	return Model{Name: m.Name, Version: m.Version, Digest: m.Digest, Size: m.Size, CreatedAt: rfc3339(m.CreatedAt)}
}

// deviceJSON builds the API view of a stored device. A reported state that
// does not decode (it was stored by the controller itself, so this means a
// bug or a damaged database) leaves the slots empty rather than hiding the
// device.
func deviceJSON(d store.Device) (Device, error) {
	out := Device{
		ID:                 d.ID,
		Labels:             d.Labels,
		Online:             d.Online,
		LastSeen:           optTime(d.LastSeen),
		AgentVersion:       d.AgentVersion,
		OS:                 d.OS,
		Arch:               d.Arch,
		Health:             d.Health,
		Slots:              []Slot{},
		ReportedGeneration: d.ReportedGeneration,
		SpoolDepth:         d.SpoolDepth,
		Inferences:         d.Inferences,
		InferenceErrors:    d.InferenceErrors,
		LastEvents:         []Event{},
	}
	if out.Labels == nil {
		out.Labels = map[string]string{}
	}
	if out.Health == "" {
		out.Health = store.HealthUnknown
	}
	if d.Desired != nil {
		des := &Desired{Generation: d.Desired.Generation, Slots: []DesiredSlot{}}
		for _, s := range d.Desired.Slots {
			des.Slots = append(des.Slots, DesiredSlot{Slot: s.Slot, Name: s.Model, Version: s.Version, Digest: s.Digest, RolloutID: s.RolloutID, Rollback: s.Rollback})
		}
		out.Desired = des
	}
	for _, e := range d.LastEvents {
		out.LastEvents = append(out.LastEvents, Event{Kind: e.Kind, Slot: e.Slot, Name: e.Model, Version: e.Version, Detail: e.Detail, At: rfc3339(e.At)})
	}
	if len(d.State) == 0 {
		return out, nil
	}
	var st pb.ReportedState
	if err := proto.Unmarshal(d.State, &st); err != nil {
		return out, err
	}
	if u := st.GetAgentUpdate(); u != nil {
		out.AgentUpdate = &AgentUpdate{Running: u.GetRunning(), Healthy: u.GetHealthy(), Pending: u.GetPending(),
			Previous: u.GetPrevious(), LastError: u.GetLastError(), RolloutID: u.GetRolloutId()}
	}
	for _, s := range st.GetSlots() {
		slot := Slot{
			Slot:      s.GetSlot(),
			Active:    modelRef(s.GetActive()),
			Previous:  modelRef(s.GetPrevious()),
			Pending:   modelRef(s.GetPending()),
			LastError: s.GetLastError(),
			Healthy:   s.GetHealthy(),
			RolloutID: s.GetRolloutId(),
			Shadow:    shadowJSON(s.GetShadow()),
		}
		if ms := s.GetActiveSinceUnixMs(); ms > 0 {
			slot.ActiveSince = optTime(time.UnixMilli(ms))
		}
		out.Slots = append(out.Slots, slot)
	}
	if out.Health == store.HealthUnknown {
		out.Health = inventory.HealthName(st.GetHealth())
	}
	return out, nil
}
