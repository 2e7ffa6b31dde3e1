package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Rollout is a staged rollout as the controller reports it
// (GET /v1/rollouts/{id}).
type Rollout struct {
	ID       string          `json:"id"`
	Model    string          `json:"model"`
	Version  string          `json:"version"`
	Slot     string          `json:"slot"`
	Selector string          `json:"selector"`
	Phase    string          `json:"phase"`
	Reason   string          `json:"reason"`
	Revision uint64          `json:"revision"`
	Spec     json.RawMessage `json:"spec"`
	// Wave is the index of the wave in progress or next to start; equal to
	// len(Waves) once all are done.
	Wave          int              `json:"wave"`
	Targets       int              `json:"targets"`
	Failures      int              `json:"failures"`
	FailureBudget int              `json:"failureBudget"`
	Steps         map[string]int   `json:"steps"`
	Waves         []RolloutWave    `json:"waves"`
	Late          map[string]int   `json:"late"`
	CreatedAt     time.Time        `json:"createdAt"`
	UpdatedAt     time.Time        `json:"updatedAt"`
	FinishedAt    *time.Time       `json:"finishedAt"`
	History       []RolloutHistory `json:"history,omitempty"`
}

// Finished reports whether the rollout will not change by itself any more.
func (r *Rollout) Finished() bool {
	return r.Phase == "succeeded" || r.Phase == "aborted" || r.Phase == "rolled-back"
}

// RolloutWave is one wave of a rollout.
type RolloutWave struct {
	Index      int        `json:"index"`
	Size       int        `json:"size"`
	State      string     `json:"state"`
	Approval   bool       `json:"approval"`
	Approved   bool       `json:"approved"`
	Override   bool       `json:"override"`
	Soak       string     `json:"soak"`
	StartedAt  *time.Time `json:"startedAt"`
	FinishedAt *time.Time `json:"finishedAt"`
	// DecisionMs is how long the controller took, once the wave's last
	// device was done, to store and publish what came next; nil until then.
	DecisionMs *float64       `json:"decisionMs"`
	Steps      map[string]int `json:"steps"`
	Failed     int            `json:"failed"`
	Gates      []GateVerdict  `json:"gates"`
}

// GateVerdict is a gate's answer with the figures it judged.
type GateVerdict struct {
	Gate    string       `json:"gate"`
	Result  string       `json:"result"`
	Detail  string       `json:"detail"`
	Figures []GateFigure `json:"figures,omitempty"`
}

// GateFigure is one number a gate judged.
type GateFigure struct {
	Name  string   `json:"name"`
	Value float64  `json:"value"`
	Limit *float64 `json:"limit,omitempty"`
	Unit  string   `json:"unit,omitempty"`
}

// RolloutHistory is one line of a rollout's history.
type RolloutHistory struct {
	At      time.Time `json:"at"`
	Message string    `json:"message"`
}

// RolloutDevice is one device's step in a rollout.
type RolloutDevice struct {
	Device     string     `json:"device"`
	Wave       int        `json:"wave"`
	Step       string     `json:"step"`
	StepAt     *time.Time `json:"stepAt"`
	Deadline   *time.Time `json:"deadline"`
	Previous   string     `json:"previous"`
	Generation uint64     `json:"generation"`
	Failure    string     `json:"failure"`
	Detail     string     `json:"detail"`
}

// RolloutPlan is what a rollout would do (a dry run).
type RolloutPlan struct {
	ID            string          `json:"id"`
	Spec          json.RawMessage `json:"spec"`
	Targets       int             `json:"targets"`
	FailureBudget int             `json:"failureBudget"`
	Waves         []PlannedWave   `json:"waves"`
}

// PlannedWave is the membership of one planned wave.
type PlannedWave struct {
	Index   int            `json:"index"`
	Devices []string       `json:"devices"`
	Strata  map[string]int `json:"strata,omitempty"`
}

// RolloutSpec is a rollout specification for the simple cases built in
// code; rollout.yaml files go to the controller as they are (see
// CreateRolloutJSON). Sizes are "10%" or "5", durations "10m".
type RolloutSpec struct {
	Name     string `json:"name,omitempty"`
	Selector string `json:"selector"`
	Model    string `json:"model,omitempty"`
	Slot     string `json:"slot,omitempty"`
	// Agent names an agent release version to roll out instead of a model.
	Agent    string          `json:"agent,omitempty"`
	Strategy RolloutStrategy `json:"strategy"`
}

// RolloutStrategy is how a rollout proceeds.
type RolloutStrategy struct {
	Waves                  []WaveSpec  `json:"waves,omitempty"`
	StratifyBy             string      `json:"stratifyBy,omitempty"`
	Soak                   string      `json:"soak,omitempty"`
	Gates                  []GateSpec  `json:"gates,omitempty"`
	FailureBudget          string      `json:"failureBudget,omitempty"`
	MaxConcurrentDownloads int         `json:"maxConcurrentDownloads,omitempty"`
	Deadline               string      `json:"deadline,omitempty"`
	Unreachable            string      `json:"unreachable,omitempty"`
	OnFailure              string      `json:"onFailure,omitempty"`
	Health                 *HealthSpec `json:"health,omitempty"`
}

// WaveSpec is one wave.
type WaveSpec struct {
	Size     string     `json:"size"`
	Soak     string     `json:"soak,omitempty"`
	Gates    []GateSpec `json:"gates,omitempty"`
	Approval bool       `json:"approval,omitempty"`
}

// GateSpec configures one gate (see the controller's rollout.GateSpec).
type GateSpec struct {
	Type          string  `json:"type"`
	Max           float64 `json:"max,omitempty"`
	Min           float64 `json:"min,omitempty"`
	MaxP95Ratio   float64 `json:"maxP95Ratio,omitempty"`
	MaxP99Ratio   float64 `json:"maxP99Ratio,omitempty"`
	MinInferences int     `json:"minInferences,omitempty"`
	// Tolerance is the shadowAgreement gate's score tolerance (relative).
	Tolerance float64 `json:"tolerance,omitempty"`
	// MaxDriftPSI is the drift gate's ceiling on the outputs' PSI (its max
	// by another name).
	MaxDriftPSI float64 `json:"maxDriftPSI,omitempty"`
}

// HealthSpec bounds the new version on each device during its soak.
type HealthSpec struct {
	MaxErrorRate  float64 `json:"maxErrorRate,omitempty"`
	MaxLatencyP99 string  `json:"maxLatencyP99,omitempty"`
	MinInferences int     `json:"minInferences,omitempty"`
}

// CreateRollout creates a rollout from spec.
func (c *Client) CreateRollout(ctx context.Context, spec RolloutSpec) (*Rollout, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	return c.CreateRolloutJSON(ctx, b)
}

// CreateRolloutJSON creates a rollout from a JSON specification.
func (c *Client) CreateRolloutJSON(ctx context.Context, spec []byte) (*Rollout, error) {
	var r Rollout
	if err := c.do(ctx, http.MethodPost, "/v1/rollouts", bytes.NewReader(spec), "application/json", &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// PlanRolloutJSON answers which devices each wave of the rollout would
// hold, without creating it.
func (c *Client) PlanRolloutJSON(ctx context.Context, spec []byte) (*RolloutPlan, error) {
	var p RolloutPlan
	if err := c.do(ctx, http.MethodPost, "/v1/rollouts?dryRun=true", bytes.NewReader(spec), "application/json", &p); err != nil {
		return nil, err
	}
	return &p, nil
}

// Rollouts lists every rollout, newest first.
func (c *Client) Rollouts(ctx context.Context) ([]Rollout, error) {
	var out struct {
		Rollouts []Rollout `json:"rollouts"`
	}
	err := c.getJSON(ctx, "/v1/rollouts", &out)
	return out.Rollouts, err
}

// Rollout returns one rollout with its history.
func (c *Client) Rollout(ctx context.Context, id string) (*Rollout, error) {
	var r Rollout
	if err := c.getJSON(ctx, "/v1/rollouts/"+url.PathEscape(id), &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// RolloutDevices returns the device steps of a rollout, optionally only
// those at step (when not "") in wave (when >= 0).
func (c *Client) RolloutDevices(ctx context.Context, id, step string, wave int) ([]RolloutDevice, error) {
	q := url.Values{}
	if step != "" {
		q.Set("step", step)
	}
	if wave >= 0 {
		q.Set("wave", strconv.Itoa(wave))
	}
	path := "/v1/rollouts/" + url.PathEscape(id) + "/devices"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out struct {
		Devices []RolloutDevice `json:"devices"`
	}
	err := c.getJSON(ctx, path, &out)
	return out.Devices, err
}

// RolloutAction applies pause, resume, approve, abort or rollback.
func (c *Client) RolloutAction(ctx context.Context, id, action string) (*Rollout, error) {
	var r Rollout
	if err := c.do(ctx, http.MethodPost, "/v1/rollouts/"+url.PathEscape(id)+"/"+url.PathEscape(action), nil, "", &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// MaxEvent caps one server-sent event; a rollout document is a few KB.
const MaxEvent = 4 << 20

// ErrStopWatching may be returned by a WatchRollout callback to end the
// watch without an error.
var ErrStopWatching = errors.New("stop watching")

// WatchRollout follows a rollout's event stream and calls fn with every
// picture of it, the current one first. It reconnects (with backoff) when
// the stream breaks, as it does while the controller restarts, and
// returns when ctx ends, when fn returns an error (nil for
// ErrStopWatching), or when the controller answers an error (an unknown
// rollout, say).
func (c *Client) WatchRollout(ctx context.Context, id string, fn func(*Rollout) error) error {
	backoff := 250 * time.Millisecond
	var last string
	for {
		err := c.watchOnce(ctx, id, last, func(ev StreamEvent) error {
			backoff = 250 * time.Millisecond
			if ev.Type != "rollout" {
				return nil
			}
			last = ev.ID
			var r Rollout
			if err := json.Unmarshal(ev.Data, &r); err != nil {
				return fmt.Errorf("rollout event is not the JSON expected: %w", err)
			}
			return fn(&r)
		})
		switch {
		case errors.Is(err, ErrStopWatching):
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		}
		var apiErr *APIError
		if errors.As(err, &apiErr) {
			return apiErr
		}
		var cb callbackError
		if errors.As(err, &cb) {
			return cb.err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// callbackError carries an error of the watch callback, which ends the
// watch, apart from stream errors, which reconnect.
type callbackError struct{ err error }

func (e callbackError) Error() string { return e.err.Error() }

func (c *Client) watchOnce(ctx context.Context, id, lastID string, fn func(StreamEvent) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/v1/rollouts/"+url.PathEscape(id)+"/events", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "text/event-stream")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	// No overall timeout: the stream lasts as long as the rollout.
	resp, err := c.stream.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		var e struct {
			Error string `json:"error"`
		}
		msg := strings.TrimSpace(string(data))
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		return fmt.Errorf("watch %s: %w", id, &APIError{Status: resp.StatusCode, Message: msg})
	}
	err = ReadEvents(resp.Body, func(ev StreamEvent) error {
		if err := fn(ev); err != nil {
			if errors.Is(err, ErrStopWatching) {
				return err
			}
			return callbackError{err}
		}
		return nil
	})
	if err == nil {
		err = io.ErrUnexpectedEOF // the server never ends a stream by itself
	}
	return err
}

// StreamEvent is one server-sent event.
type StreamEvent struct {
	Type string
	ID   string
	Data []byte
}

// ReadEvents parses a text/event-stream from r and calls fn for each
// event, until r ends (nil), fn fails, or an event or line exceeds
// MaxEvent (an error naming the limit). Comment lines are skipped.
func ReadEvents(r io.Reader, fn func(StreamEvent) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var ev StreamEvent
	var data bytes.Buffer
	for {
		line, err := readLine(br)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if len(line) == 0 {
			if data.Len() > 0 || ev.Type != "" {
				ev.Data = bytes.TrimSuffix(data.Bytes(), []byte("\n"))
				if ev.Type == "" {
					ev.Type = "message"
				}
				if err := fn(ev); err != nil {
					return err
				}
			}
			ev = StreamEvent{}
			data.Reset()
			continue
		}
		if line[0] == ':' {
			continue
		}
		field, value, _ := strings.Cut(string(line), ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "event":
			ev.Type = value
		case "id":
			ev.ID = value
		case "data":
			if data.Len()+len(value) > MaxEvent {
				return fmt.Errorf("event stream: an event is over %d bytes", MaxEvent)
			}
			data.WriteString(value)
			data.WriteByte('\n')
		}
	}
}

// readLine reads one line without its line ending, refusing lines over
// MaxEvent.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, isPrefix, err := br.ReadLine()
		if err != nil {
			return nil, err
		}
		line = append(line, chunk...)
		if len(line) > MaxEvent {
			return nil, fmt.Errorf("event stream: a line is over %d bytes", MaxEvent)
		}
		if !isPrefix {
			return line, nil
		}
	}
}
