// Package api serves the controller's HTTP API: JSON under /v1/ (camelCase
// fields, errors as {"error": "..."}), content-addressed artifact downloads
// with Range support, /healthz and /metrics. The fleet CLI and any other
// client use only this API.
//
//	GET  /healthz                  200 "ok"
//	GET  /metrics                  Prometheus text format
//	POST /v1/models                body: bundle file -> 201 Model (200 if already stored, 409 on a name@version clash, 400 bad bundle)
//	GET  /v1/models                ModelList
//	GET  /v1/artifacts/{sha256}    bundle bytes, Range and If-None-Match support, ETag = digest
//	GET  /v1/devices?selector=SEL  DeviceList, sorted by id
//	GET  /v1/devices/{id}          Device, 404 if unknown
//	POST /v1/assignments           AssignmentRequest -> AssignmentResponse
//	GET  /v1/telemetry             TelemetrySummary (telemetry.go): counts, errors, latency, drift
//	GET  /v1/devices/{id}/telemetry TelemetrySummary of one device
//
//	POST /v1/rollouts              rollout specification (rollout.Spec, JSON) -> 201 Rollout; 400 bad spec,
//	                               404 unknown model, 409 name taken or another rollout manages the slot
//	POST /v1/rollouts?dryRun=true  the same, answering the RolloutPlan without creating anything
//	GET  /v1/rollouts              RolloutList, newest first
//	GET  /v1/rollouts/{id}         Rollout (with history)
//	GET  /v1/rollouts/{id}/devices RolloutDeviceList; ?step=failed&wave=0 filter
//	POST /v1/rollouts/{id}/{action} pause|resume|approve|abort|rollback -> Rollout; 409 if not possible now
//	GET  /v1/rollouts/{id}/events  text/event-stream of "rollout" events (the Rollout, one JSON line)
//
//	POST   /v1/tokens              TokenRequest -> 201 TokenCreated (the secret, shown once); 409 name taken
//	GET    /v1/tokens              TokenList (no secrets)
//	DELETE /v1/tokens/{name}       revoke; 409 for the last valid admin token
//	GET    /v1/audit?limit=N&before=ID&who=NAME  AuditList, newest first
//
//	GET  /v1/keys                    KeyList: director key in use, every key announcement (viewer)
//	POST /v1/keys/director/rotate    RotateRequest -> KeyAnnouncement: new director key, announced to agents
//	POST /v1/keys/announcements      body: a SignedKeyAnnouncement (`fleet keys rotate-release`) -> 201 KeyAnnouncement; 409 out of sequence
//
// Every endpoint but /healthz, /metrics and artifact downloads needs an
// "Authorization: Bearer <token>" header whose token has the role
// access.Required names (viewer to read, operator to change, admin for
// tokens and keys): 401 without a valid token, 403 with too weak a role.
// Every request that may change something is written to the audit log.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"time"

	"github.com/edgefleet/edgefleet/controller/director"
	"github.com/edgefleet/edgefleet/controller/registry"
	"github.com/edgefleet/edgefleet/controller/selector"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// MaxJSONBody caps a JSON request body.
const MaxJSONBody = 64 << 10

// Devices reads the inventory.
type Devices interface {
	Devices(ctx context.Context) ([]store.Device, error)
	Device(ctx context.Context, id string) (store.Device, error)
}

// Registry stores and serves models.
type Registry interface {
	Push(ctx context.Context, data []byte) (store.Model, bool, error)
	Open(digest string) (*os.File, error)
	Model(ctx context.Context, name, version string) (store.Model, error)
	Models(ctx context.Context) ([]store.Model, error)
}

// Assigner changes desired states.
type Assigner interface {
	Assign(ctx context.Context, ids []string, slot string, m store.Model) ([]director.Result, error)
}

// Options configure the API.
type Options struct {
	Devices  Devices
	Registry Registry
	Assigner Assigner
	// Releases serves the agent release endpoints (releases.go); nil
	// answers 404 there.
	Releases Releases
	// Telemetry serves /v1/telemetry and /v1/devices/{id}/telemetry
	// (telemetry.go); nil answers 404 there.
	Telemetry telemetry.Reader
	// Rollouts serves /v1/rollouts; nil answers 404 there.
	Rollouts Rollouts
	// Tokens authenticates callers and serves /v1/tokens; nil refuses
	// every request that needs a token.
	Tokens Tokens
	// Keys serves /v1/keys (keys.go); nil answers 404 there.
	Keys Keys
	// Audit records every change and serves /v1/audit.
	Audit AuditLog
	// Metrics serves GET /metrics; nil answers 404.
	Metrics http.Handler
	Logger  *slog.Logger
	// Stopping, when closed, ends the event streams, which would otherwise
	// keep a graceful shutdown waiting.
	Stopping <-chan struct{}
}

type server struct {
	Options
	log *slog.Logger
}

// New returns the API's handler.
func New(opts Options) http.Handler {
	s := &server{Options: opts, log: opts.Logger}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok")
	})
	if opts.Metrics != nil {
		mux.Handle("GET /metrics", opts.Metrics)
	}
	mux.HandleFunc("POST /v1/models", s.pushModel)
	mux.HandleFunc("GET /v1/models", s.listModels)
	mux.HandleFunc("GET /v1/artifacts/{sha256}", s.artifact)
	mux.HandleFunc("GET /v1/devices", s.listDevices)
	mux.HandleFunc("GET /v1/devices/{id}", s.device)
	mux.HandleFunc("POST /v1/assignments", s.assign)
	s.routeReleases(mux)
	s.routeTelemetry(mux)
	if opts.Rollouts != nil {
		mux.HandleFunc("POST /v1/rollouts", s.createRollout)
		mux.HandleFunc("GET /v1/rollouts", s.listRollouts)
		mux.HandleFunc("GET /v1/rollouts/{id}", s.getRollout)
		mux.HandleFunc("GET /v1/rollouts/{id}/devices", s.rolloutDevices)
		mux.HandleFunc("GET /v1/rollouts/{id}/events", s.rolloutEvents)
		mux.HandleFunc("POST /v1/rollouts/{id}/{action}", s.rolloutAction)
	}
	if opts.Tokens != nil {
		mux.HandleFunc("POST /v1/tokens", s.createToken)
		mux.HandleFunc("GET /v1/tokens", s.listTokens)
		mux.HandleFunc("DELETE /v1/tokens/{name}", s.revokeToken)
	}
	s.routeKeys(mux)
	if opts.Audit != nil {
		mux.HandleFunc("GET /v1/audit", s.listAudit)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
	})
	return s.logRequests(s.guard(mux))
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection (to flush
// event streams).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// ReadFrom hands a body read from a file (an artifact, served by
// http.ServeContent) to the connection's own ReadFrom, which sends it with
// sendfile. Without it io.Copy reads every download through a new 32 KiB
// buffer: 420 MB of garbage over a 10,000-device rollout (BENCHMARKS.md).
func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
}

func (s *server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)
		lvl := slog.LevelDebug
		if sw.status >= 500 {
			lvl = slog.LevelWarn
		}
		s.log.Log(r.Context(), lvl, "http request", "method", r.Method, "path", r.URL.Path, "status", sw.status, "duration", time.Since(start))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, Error{Error: msg})
}

// internalError logs the cause and tells the client only that it failed:
// store errors may name files and SQL the client has no use for.
func (s *server) internalError(w http.ResponseWriter, r *http.Request, err error) {
	s.log.Error("http request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	writeError(w, http.StatusInternalServerError, "internal error; see the controller's log")
}

func (s *server) pushModel(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, bundle.MaxBundleSize))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("bundle is over the %d byte limit", bundle.MaxBundleSize))
		return
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "read bundle: "+err.Error())
		return
	}
	if len(data) == 0 {
		writeError(w, http.StatusBadRequest, "empty body: send the bundle file's bytes (application/octet-stream)")
		return
	}
	noteTarget(r, "bundle of %d bytes", len(data))
	m, created, err := s.Registry.Push(r.Context(), data)
	if err == nil {
		noteTarget(r, "model %s@%s sha256:%s", m.Name, m.Version, m.Digest)
	}
	switch {
	case errors.Is(err, bundle.ErrInvalid):
		writeError(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, store.ErrConflict):
		writeError(w, http.StatusConflict, err.Error())
	case err != nil:
		s.internalError(w, r, err)
	case created:
		writeJSON(w, http.StatusCreated, modelJSON(m))
	default:
		writeJSON(w, http.StatusOK, modelJSON(m))
	}
}

func (s *server) listModels(w http.ResponseWriter, r *http.Request) {
	ms, err := s.Registry.Models(r.Context())
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	out := ModelList{Models: []Model{}}
	for _, m := range ms {
		out.Models = append(out.Models, modelJSON(m))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) artifact(w http.ResponseWriter, r *http.Request) {
	digest := r.PathValue("sha256")
	f, err := s.Registry.Open(digest)
	switch {
	case errors.Is(err, registry.ErrBadDigest):
		writeError(w, http.StatusBadRequest, err.Error())
		return
	case errors.Is(err, os.ErrNotExist):
		writeError(w, http.StatusNotFound, fmt.Sprintf("artifact %s is not stored; list models with GET /v1/models", digest))
		return
	case err != nil:
		s.internalError(w, r, err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("ETag", `"`+digest+`"`)
	// Content-addressed: the bytes behind this URL never change.
	h.Set("Cache-Control", "public, max-age=31536000, immutable")
	http.ServeContent(w, r, "", fi.ModTime(), f)
}

func (s *server) listDevices(w http.ResponseWriter, r *http.Request) {
	sel, err := selector.Parse(r.URL.Query().Get("selector"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	devs, err := s.Devices.Devices(r.Context())
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	out := DeviceList{Devices: []Device{}}
	for _, d := range devs {
		if !sel.Matches(d.Labels) {
			continue
		}
		out.Devices = append(out.Devices, s.deviceJSON(d))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) deviceJSON(d store.Device) Device {
	out, err := deviceJSON(d)
	if err != nil {
		s.log.Error("stored reported state does not decode", "device", d.ID, "err", err)
	}
	return out
}

func (s *server) device(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := wire.ValidateDeviceID(id); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	d, err := s.Devices.Device(r.Context(), id)
	if errors.Is(err, store.ErrNotFound) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("device %q is not known; list devices with GET /v1/devices", id))
		return
	}
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.deviceJSON(d))
}

var slotRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

func (s *server) assign(w http.ResponseWriter, r *http.Request) {
	var req AssignmentRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxJSONBody)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, `body: want JSON like {"model":"grid-anomaly","version":"1.0.0","slot":"default","selector":"region=eu"}: `+err.Error())
		return
	}
	if req.Model == "" || req.Version == "" {
		writeError(w, http.StatusBadRequest, `"model" and "version" are required`)
		return
	}
	if req.Slot == "" {
		req.Slot = director.DefaultSlot
	}
	noteTarget(r, "%s@%s slot %s selector %q", req.Model, req.Version, req.Slot, req.Selector)
	if !slotRE.MatchString(req.Slot) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("slot %q: use 1-63 lowercase letters, digits, '.', '_' or '-'", req.Slot))
		return
	}
	sel, err := selector.Parse(req.Selector)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	m, err := s.Registry.Model(r.Context(), req.Model, req.Version)
	if errors.Is(err, store.ErrNotFound) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("model %s@%s is not stored; push its bundle first (POST /v1/models)", req.Model, req.Version))
		return
	}
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	devs, err := s.Devices.Devices(r.Context())
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	var ids []string
	for _, d := range devs {
		if sel.Matches(d.Labels) {
			ids = append(ids, d.ID)
		}
	}
	if len(ids) == 0 {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("no device matches selector %q; check the labels with GET /v1/devices", sel.String()))
		return
	}
	if s.Rollouts != nil {
		// A rollout in progress owns the slot on its devices; an assignment
		// underneath it would read as a device rolling back by itself.
		if err := s.Rollouts.CheckUnclaimed(r.Context(), ids, req.Slot); err != nil {
			s.rolloutError(w, r, err)
			return
		}
	}
	results, err := s.Assigner.Assign(r.Context(), ids, req.Slot, m)
	if errors.Is(err, store.ErrNotFound) {
		// A device or the model vanished between the reads and the write.
		writeError(w, http.StatusConflict, err.Error()+"; retry the assignment")
		return
	}
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	out := AssignmentResponse{Devices: []string{}}
	for _, res := range results {
		out.Devices = append(out.Devices, res.DeviceID)
		if res.PublishErr != nil {
			out.Unpublished = append(out.Unpublished, res.DeviceID)
		}
	}
	writeJSON(w, http.StatusOK, out)
}
