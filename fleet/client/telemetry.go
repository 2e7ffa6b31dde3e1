package client

import (
	"context"
	"net/url"
	"strconv"
	"time"
)

// TelemetryQuery selects the figures of GET /v1/telemetry. Empty fields
// select everything; Since and Until are RFC 3339 times or durations back
// from now ("1h", "7d").
type TelemetryQuery struct {
	Model, Version, Device, Rollout string
	// Wave >= 0 keeps one wave of Rollout; -1 (or Rollout empty) all.
	Wave         int
	Since, Until string
	// By is "version" (default) or "device".
	By string
}

// TelemetryFigures sum up one group's inferences.
type TelemetryFigures struct {
	Model        string          `json:"model"`
	Version      string          `json:"version"`
	DeviceID     string          `json:"deviceId,omitempty"`
	Devices      int             `json:"devices"`
	Count        uint64          `json:"count"`
	Errors       uint64          `json:"errors"`
	Timeouts     uint64          `json:"timeouts"`
	ErrorRate    float64         `json:"errorRate"`
	LatencyP50Ms float64         `json:"latencyP50Ms"`
	LatencyP95Ms float64         `json:"latencyP95Ms"`
	LatencyP99Ms float64         `json:"latencyP99Ms"`
	NaNValues    uint64          `json:"nanValues"`
	OutOfRange   uint64          `json:"outOfRangeValues"`
	First        time.Time       `json:"first"`
	Last         time.Time       `json:"last"`
	Drift        *TelemetryDrift `json:"drift,omitempty"`
}

// TelemetryDrift is drift against the model's reference.
type TelemetryDrift struct {
	Outputs      []DriftFigure `json:"outputs,omitempty"`
	Features     []DriftFigure `json:"features,omitempty"`
	MaxOutputPSI float64       `json:"maxOutputPsi"`
	MaxOutputJS  float64       `json:"maxOutputJs"`
	Observed     uint64        `json:"observed"`
	Note         string        `json:"note,omitempty"`
}

// DriftFigure is the drift of one output or feature.
type DriftFigure struct {
	Name     string  `json:"name"`
	Observed uint64  `json:"observed"`
	PSI      float64 `json:"psi"`
	JS       float64 `json:"js"`
}

// TelemetrySummary is the answer of the telemetry endpoints.
type TelemetrySummary struct {
	Since  time.Time          `json:"since"`
	Until  time.Time          `json:"until"`
	Groups []TelemetryFigures `json:"groups"`
}

// Telemetry reads the fleet's figures.
func (c *Client) Telemetry(ctx context.Context, q TelemetryQuery) (*TelemetrySummary, error) {
	v := url.Values{}
	for k, s := range map[string]string{"model": q.Model, "version": q.Version, "device": q.Device, "rollout": q.Rollout,
		"since": q.Since, "until": q.Until, "by": q.By} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if q.Rollout != "" && q.Wave >= 0 {
		v.Set("wave", strconv.Itoa(q.Wave))
	}
	var out TelemetrySummary
	if err := c.getJSON(ctx, "/v1/telemetry?"+v.Encode(), &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// DeviceTelemetry reads one device's figures per model version since a
// time or duration back from now.
func (c *Client) DeviceTelemetry(ctx context.Context, id, since string) (*TelemetrySummary, error) {
	path := "/v1/devices/" + url.PathEscape(id) + "/telemetry"
	if since != "" {
		path += "?since=" + url.QueryEscape(since)
	}
	var out TelemetrySummary
	if err := c.getJSON(ctx, path, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
