package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/edgefleet/edgefleet/controller/rollout"
)

// Rollouts runs staged rollouts; *rollout.Engine is one.
type Rollouts interface {
	Create(ctx context.Context, spec rollout.Spec) (string, error)
	Plan(ctx context.Context, spec rollout.Spec) (rollout.PlannedRollout, error)
	Act(ctx context.Context, id string, a rollout.Action) error
	Status(ctx context.Context, id string) (rollout.Status, error)
	List(ctx context.Context) ([]rollout.Status, error)
	Devices(ctx context.Context, id string) ([]rollout.DeviceStatus, error)
	Subscribe(id string) (<-chan struct{}, func())
	KnownGate(t string) bool
	// CheckUnclaimed fails (wrapping rollout.ErrConflict) when a rollout in
	// progress manages slot on any of the devices.
	CheckUnclaimed(ctx context.Context, ids []string, slot string) error
}

// HeartbeatInterval is how often an idle event stream gets a comment
// line, so proxies and clients see it is alive.
const HeartbeatInterval = 15 * time.Second

// minEventGap spaces the events of one stream: a wave of thousands of
// devices changes the rollout many times a second, and a watcher needs
// only the latest picture.
const minEventGap = 200 * time.Millisecond

// Rollout is the API's view of a rollout.
type Rollout struct {
	ID       string       `json:"id"`
	Model    string       `json:"model"`
	Version  string       `json:"version"`
	Slot     string       `json:"slot"`
	Selector string       `json:"selector"`
	Phase    string       `json:"phase"`
	Reason   string       `json:"reason"`
	Revision uint64       `json:"revision"`
	Spec     rollout.Spec `json:"spec"`
	// Wave is the index of the wave in progress or next to start, equal to
	// len(waves) once all are done.
	Wave          int            `json:"wave"`
	Targets       int            `json:"targets"`
	Failures      int            `json:"failures"`
	FailureBudget int            `json:"failureBudget"`
	Steps         map[string]int `json:"steps"`
	Waves         []RolloutWave  `json:"waves"`
	// Late counts, by step, devices that joined the selector during the
	// rollout and got the version when it succeeded.
	Late       map[string]int   `json:"late"`
	CreatedAt  string           `json:"createdAt"`
	UpdatedAt  string           `json:"updatedAt"`
	FinishedAt *string          `json:"finishedAt"`
	History    []RolloutHistory `json:"history,omitempty"`
}

// RolloutWave is one wave of a rollout.
type RolloutWave struct {
	Index      int     `json:"index"`
	Size       int     `json:"size"`
	State      string  `json:"state"`
	Approval   bool    `json:"approval"`
	Approved   bool    `json:"approved"`
	Override   bool    `json:"override"`
	Soak       string  `json:"soak"`
	StartedAt  *string `json:"startedAt"`
	FinishedAt *string `json:"finishedAt"`
	// DecisionMs is how long the controller took, once the wave's last
	// device was done, to store and publish what came next; absent until
	// then.
	DecisionMs *float64          `json:"decisionMs,omitempty"`
	Steps      map[string]int    `json:"steps"`
	Failed     int               `json:"failed"`
	Gates      []rollout.Verdict `json:"gates"`
}

// RolloutHistory is one line of a rollout's history.
type RolloutHistory struct {
	At      string `json:"at"`
	Message string `json:"message"`
}

// RolloutList is the body of GET /v1/rollouts.
type RolloutList struct {
	Rollouts []Rollout `json:"rollouts"`
}

// RolloutPlan is the answer to POST /v1/rollouts?dryRun=true.
type RolloutPlan struct {
	ID            string        `json:"id"`
	Spec          rollout.Spec  `json:"spec"`
	Targets       int           `json:"targets"`
	FailureBudget int           `json:"failureBudget"`
	Waves         []PlannedWave `json:"waves"`
}

// PlannedWave is one wave of a plan.
type PlannedWave struct {
	Index   int      `json:"index"`
	Devices []string `json:"devices"`
	// Strata counts the wave's devices by value of the stratifyBy label.
	Strata map[string]int `json:"strata,omitempty"`
}

// RolloutDevice is one device's step in a rollout.
type RolloutDevice struct {
	Device     string  `json:"device"`
	Wave       int     `json:"wave"`
	Step       string  `json:"step"`
	StepAt     *string `json:"stepAt"`
	Deadline   *string `json:"deadline"`
	Previous   string  `json:"previous"`
	Generation uint64  `json:"generation"`
	Failure    string  `json:"failure"`
	Detail     string  `json:"detail"`
}

// RolloutDeviceList is the body of GET /v1/rollouts/{id}/devices.
type RolloutDeviceList struct {
	Devices []RolloutDevice `json:"devices"`
}

func stepCounts(m map[rollout.Step]int) map[string]int {
	out := map[string]int{}
	for s, n := range m {
		if n > 0 {
			out[s.String()] = n
		}
	}
	return out
}

// RolloutJSON builds the API view of a rollout's status.
func RolloutJSON(s rollout.Status) Rollout {
	out := Rollout{
		ID: s.ID, Model: s.Model, Version: s.Version, Slot: s.Slot, Selector: s.Spec.Selector,
		Phase: string(s.Phase), Reason: s.Reason, Revision: s.Revision, Spec: s.Spec, Wave: s.Wave,
		Targets: s.Targets, Failures: s.Failures, FailureBudget: s.FailureBudget,
		Steps: stepCounts(s.Steps), Waves: []RolloutWave{}, Late: stepCounts(s.Late),
		CreatedAt: rfc3339(s.CreatedAt), UpdatedAt: rfc3339(s.UpdatedAt), FinishedAt: optTime(s.FinishedAt),
	}
	for _, w := range s.Waves {
		rw := RolloutWave{
			Index: w.Index, Size: w.Size, State: string(w.State), Approval: w.Approval, Approved: w.Approved,
			Override: w.Override, Soak: w.Soak.String(), StartedAt: optTime(w.StartedAt), FinishedAt: optTime(w.FinishedAt),
			Steps: stepCounts(w.Steps), Failed: w.Failed, Gates: w.Verdicts,
		}
		if rw.Gates == nil {
			rw.Gates = []rollout.Verdict{}
		}
		if w.DecidedAfter >= 0 {
			ms := float64(w.DecidedAfter.Microseconds()) / 1000
			rw.DecisionMs = &ms
		}
		out.Waves = append(out.Waves, rw)
	}
	for _, h := range s.History {
		out.History = append(out.History, RolloutHistory{At: rfc3339(h.At), Message: h.Message})
	}
	return out
}

func orGenerated(name string) string {
	if name == "" {
		return "(name to be generated)"
	}
	return name
}

// rolloutError answers an error of the rollout engine.
func (s *server) rolloutError(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, rollout.ErrInvalid):
		writeError(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, rollout.ErrNotFound):
		writeError(w, http.StatusNotFound, err.Error())
	case errors.Is(err, rollout.ErrConflict), errors.Is(err, rollout.ErrState):
		writeError(w, http.StatusConflict, err.Error())
	case errors.Is(err, rollout.ErrStopped):
		writeError(w, http.StatusServiceUnavailable, "the controller is shutting down or starting; retry in a moment")
	default:
		s.internalError(w, r, err)
	}
}

func (s *server) createRollout(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, rollout.MaxSpecSize))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("rollout specification is over the %d byte limit", rollout.MaxSpecSize))
		return
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "read body: "+err.Error())
		return
	}
	spec, err := rollout.ParseSpecKnown(data, s.Rollouts.KnownGate)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error()+`; a minimal rollout is {"selector":"region=eu","model":"grid-anomaly@1.1.0","strategy":{"waves":["10%","100%"]}}`)
		return
	}
	noteTarget(r, "rollout %s of %s into slot %s, selector %q", orGenerated(spec.Name), spec.Model, spec.Slot, spec.Selector)
	if dry, _ := strconv.ParseBool(r.URL.Query().Get("dryRun")); dry {
		p, err := s.Rollouts.Plan(r.Context(), spec)
		if err != nil {
			s.rolloutError(w, r, err)
			return
		}
		out := RolloutPlan{ID: p.ID, Spec: p.Spec, Targets: p.Targets, FailureBudget: p.FailureBudget, Waves: []PlannedWave{}}
		for i, pw := range p.Waves {
			wv := PlannedWave{Index: i, Devices: make([]string, 0, len(pw.Devices))}
			for _, t := range pw.Devices {
				wv.Devices = append(wv.Devices, t.ID)
				if spec.Strategy.StratifyBy != "" {
					if wv.Strata == nil {
						wv.Strata = map[string]int{}
					}
					wv.Strata[t.Stratum]++
				}
			}
			out.Waves = append(out.Waves, wv)
		}
		writeJSON(w, http.StatusOK, out)
		return
	}
	id, err := s.Rollouts.Create(r.Context(), spec)
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	noteTarget(r, "rollout %s of %s into slot %s, selector %q", id, spec.Model, spec.Slot, spec.Selector)
	st, err := s.Rollouts.Status(r.Context(), id)
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	w.Header().Set("Location", "/v1/rollouts/"+id)
	writeJSON(w, http.StatusCreated, RolloutJSON(st))
}

func (s *server) listRollouts(w http.ResponseWriter, r *http.Request) {
	all, err := s.Rollouts.List(r.Context())
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	out := RolloutList{Rollouts: []Rollout{}}
	for _, st := range all {
		out.Rollouts = append(out.Rollouts, RolloutJSON(st))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) rolloutID(w http.ResponseWriter, r *http.Request) (string, bool) {
	id := r.PathValue("id")
	if !rollout.ValidName(id) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("rollout id %q is malformed; list rollouts with GET /v1/rollouts", id))
		return "", false
	}
	return id, true
}

func (s *server) getRollout(w http.ResponseWriter, r *http.Request) {
	id, ok := s.rolloutID(w, r)
	if !ok {
		return
	}
	st, err := s.Rollouts.Status(r.Context(), id)
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, RolloutJSON(st))
}

func (s *server) rolloutDevices(w http.ResponseWriter, r *http.Request) {
	id, ok := s.rolloutID(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	var stepFilter *rollout.Step
	if v := q.Get("step"); v != "" {
		st, err := rollout.ParseStep(v)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("step %q: use one of %v", v, rollout.Steps()))
			return
		}
		stepFilter = &st
	}
	waveFilter := -1
	if v := q.Get("wave"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("wave %q: give a wave index (0 is the first wave)", v))
			return
		}
		waveFilter = n
	}
	devs, err := s.Rollouts.Devices(r.Context(), id)
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	out := RolloutDeviceList{Devices: []RolloutDevice{}}
	for _, d := range devs {
		if (stepFilter != nil && d.Step != *stepFilter) || (waveFilter >= 0 && d.Wave != waveFilter) {
			continue
		}
		out.Devices = append(out.Devices, RolloutDevice{
			Device: d.Device, Wave: d.Wave, Step: d.Step.String(), StepAt: optTime(d.StepAt), Deadline: optTime(d.Deadline),
			Previous: d.Previous, Generation: d.Generation, Failure: d.Failure, Detail: d.Detail,
		})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) rolloutAction(w http.ResponseWriter, r *http.Request) {
	id, ok := s.rolloutID(w, r)
	if !ok {
		return
	}
	a := rollout.Action(r.PathValue("action"))
	if !slices.Contains(rollout.Actions(), a) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no action %q; use pause, resume, approve, abort or rollback", a))
		return
	}
	if err := s.Rollouts.Act(r.Context(), id, a); err != nil {
		s.rolloutError(w, r, err)
		return
	}
	st, err := s.Rollouts.Status(r.Context(), id)
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, RolloutJSON(st))
}

// rolloutEvents streams a rollout as server-sent events: one "rollout"
// event with the whole Rollout document (one JSON line) at once and after
// every change, its revision as the event id, and a comment line every
// HeartbeatInterval.
func (s *server) rolloutEvents(w http.ResponseWriter, r *http.Request) {
	id, ok := s.rolloutID(w, r)
	if !ok {
		return
	}
	ctx := r.Context()
	changed, cancel := s.Rollouts.Subscribe(id)
	defer cancel()
	st, err := s.Rollouts.Status(ctx, id)
	if err != nil {
		s.rolloutError(w, r, err)
		return
	}
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	send := func(st rollout.Status) error {
		b, err := json.Marshal(RolloutJSON(st))
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(w, "event: rollout\nid: %d\ndata: %s\n\n", st.Revision, b); err != nil {
			return err
		}
		return rc.Flush()
	}
	if err := send(st); err != nil {
		return
	}
	last := st.Revision
	beat := time.NewTicker(HeartbeatInterval)
	defer beat.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.Stopping:
			return
		case <-beat.C:
			if _, err := io.WriteString(w, ": ping\n\n"); err != nil || rc.Flush() != nil {
				return
			}
		case <-changed:
			st, err := s.Rollouts.Status(ctx, id)
			if err != nil {
				return
			}
			if st.Revision != last {
				if err := send(st); err != nil {
					return
				}
				last = st.Revision
			}
			select {
			case <-time.After(minEventGap):
			case <-ctx.Done():
				return
			}
		}
	}
}
