package api

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry"
)

// Telemetry endpoints (viewer role), figures summed from the per-device,
// per-minute inference aggregates:
//
//	GET /v1/telemetry?model=M&version=V&device=ID&rollout=R&wave=N&since=T&until=T&by=version|device
//	                               TelemetrySummary: per model version (or per device and
//	                               version) counts, errors, error rate, latency p50/p95/p99
//	                               and drift (PSI, JS) against the manifest's reference
//	GET /v1/devices/{id}/telemetry?since=T&until=T
//	                               TelemetrySummary of one device, per version
//
// since and until are RFC 3339 times or durations back from now ("1h",
// "7d"); since defaults to 1h, until to now. rollout keeps the rollout's
// devices and defaults model and version to the rollout's; wave keeps one
// wave's devices.

// TelemetrySummary is the answer of the telemetry endpoints.
type TelemetrySummary struct {
	Since  time.Time           `json:"since"`
	Until  time.Time           `json:"until"`
	Groups []telemetry.Figures `json:"groups"`
}

func (s *server) routeTelemetry(mux *http.ServeMux) {
	if s.Telemetry == nil {
		return
	}
	mux.HandleFunc("GET /v1/telemetry", s.telemetrySummary)
	mux.HandleFunc("GET /v1/devices/{id}/telemetry", s.telemetrySummary)
}

func (s *server) telemetrySummary(w http.ResponseWriter, r *http.Request) {
	now := time.Now().UTC()
	q := r.URL.Query()
	since, err := parseWhen(q.Get("since"), now, time.Hour)
	if err != nil {
		writeError(w, http.StatusBadRequest, "since: "+err.Error())
		return
	}
	until, err := parseWhen(q.Get("until"), now, 0)
	if err != nil {
		writeError(w, http.StatusBadRequest, "until: "+err.Error())
		return
	}
	tq := telemetry.Query{Model: q.Get("model"), Version: q.Get("version"), DeviceID: q.Get("device"),
		RolloutID: q.Get("rollout"), Wave: -1, Since: since, Until: until, By: q.Get("by")}
	if id := r.PathValue("id"); id != "" {
		tq.DeviceID = id
	}
	if v := q.Get("wave"); v != "" {
		if tq.Wave, err = strconv.Atoi(v); err != nil || tq.Wave < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("wave %q: give the wave's index, 0 for the first", v))
			return
		}
		if tq.RolloutID == "" {
			writeError(w, http.StatusBadRequest, "wave needs rollout: name the rollout whose wave you mean")
			return
		}
	}
	groups, err := telemetry.Summarize(r.Context(), s.Telemetry, tq)
	switch {
	case errors.Is(err, telemetry.ErrBadQuery):
		writeError(w, http.StatusBadRequest, err.Error())
		return
	case errors.Is(err, store.ErrNotFound):
		writeError(w, http.StatusNotFound, err.Error())
		return
	case err != nil:
		s.internalError(w, r, err)
		return
	}
	if groups == nil {
		groups = []telemetry.Figures{}
	}
	writeJSON(w, http.StatusOK, TelemetrySummary{Since: since, Until: until, Groups: groups})
}

// parseWhen reads an RFC 3339 time or a duration back from now ("90m",
// "7d"); empty is def back from now.
func parseWhen(v string, now time.Time, def time.Duration) (time.Time, error) {
	if v == "" {
		return now.Add(-def), nil
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	d, err := time.ParseDuration(v)
	if days, ok := strings.CutSuffix(v, "d"); ok && err != nil {
		var n float64
		if n, err = strconv.ParseFloat(days, 64); err == nil {
			d = time.Duration(n * float64(24*time.Hour))
		}
	}
	if err != nil || d < 0 {
		return time.Time{}, fmt.Errorf("%q: give an RFC 3339 time (2026-01-02T15:04:05Z) or a duration back from now (90m, 7d)", v)
	}
	return now.Add(-d), nil
}
