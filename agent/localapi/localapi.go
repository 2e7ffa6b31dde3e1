// Package localapi is the agent's local inference endpoint: the Open
// Inference Protocol v2 REST API for apps on the device, plus health and
// Prometheus metrics.
//
//	GET  /v2/health/live                          200 while the process runs
//	GET  /v2/health/ready                         200 when a model is active, else 503
//	GET  /v2/models/{name}                        model metadata
//	GET  /v2/models/{name}/ready                  200 when the model is active, else 404
//	POST /v2/models/{name}/infer                  run the active model
//	POST /v2/models/{name}/versions/{v}/infer     the same, only if version v is active
//	GET  /metrics                                 Prometheus text format
//
// Errors are JSON {"error": "..."}, the protocol's error shape. The
// endpoint only translates HTTP: Models runs the inference, and the agent
// behind it records the outcome for telemetry and the health watch.
package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
)

// Platform is the OIP platform name of every model the agent serves.
const Platform = "edgefleet-wasm"

// DefaultMaxBody caps an inference request body.
const DefaultMaxBody = 4 << 20

// maxInputs caps the tensors of one request.
const maxInputs = 64

// Models is where the endpoint finds the model serving a name; the agent
// (over deploy.Manager) is one.
type Models interface {
	// Infer runs the active model serving name; a non-empty version must
	// be the active one's, else the error wraps deploy.ErrNoModel.
	Infer(ctx context.Context, name, version string, in []tensor.Tensor) (deploy.Result, error)
	// Manifest returns the manifest of the active model serving name.
	Manifest(name string) (*bundle.Manifest, bool)
	// Ready reports whether at least one model is active.
	Ready() bool
}

// Options configures a Server. Models is required.
type Options struct {
	Models Models
	Logger *slog.Logger
	// MaxBody caps a request body in bytes (default DefaultMaxBody).
	MaxBody int64
	// Metrics, if set, writes more metrics (the agent's link, spool and
	// deployment counters) after the endpoint's own.
	Metrics func(w io.Writer)
}

// Server serves the local API. Its Handler is safe for concurrent use.
type Server struct {
	o   Options
	log *slog.Logger
	mux *http.ServeMux

	mu    sync.Mutex
	calls map[callKey]*callStats

	rejected struct{ tooLarge, badRequest, notFound atomic.Uint64 }
}

type callKey struct{ model, version string }

type callStats struct {
	ok, failed uint64
	latencySum time.Duration
}

// New returns a Server.
func New(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxBody <= 0 {
		o.MaxBody = DefaultMaxBody
	}
	s := &Server{o: o, log: o.Logger, mux: http.NewServeMux(), calls: map[callKey]*callStats{}}
	s.mux.HandleFunc("GET /v2/health/live", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]bool{"live": true})
	})
	s.mux.HandleFunc("GET /v2/health/ready", s.ready)
	s.mux.HandleFunc("GET /v2/models/{name}", s.metadata)
	s.mux.HandleFunc("GET /v2/models/{name}/ready", s.modelReady)
	s.mux.HandleFunc("POST /v2/models/{name}/infer", s.infer)
	s.mux.HandleFunc("POST /v2/models/{name}/versions/{version}/infer", s.infer)
	s.mux.HandleFunc("GET /metrics", s.metrics)
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s %s; see /v2/health/ready, /v2/models/{name} and /v2/models/{name}/infer", r.Method, r.URL.Path))
	})
	return s
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler { return s.mux }

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	if s.o.Models.Ready() {
		writeJSON(w, http.StatusOK, map[string]bool{"ready": true})
		return
	}
	writeJSON(w, http.StatusServiceUnavailable, map[string]bool{"ready": false})
}

// ModelMetadata is the OIP model metadata response.
type ModelMetadata struct {
	Name     string        `json:"name"`
	Versions []string      `json:"versions"`
	Platform string        `json:"platform"`
	Inputs   []tensor.Spec `json:"inputs"`
	Outputs  []tensor.Spec `json:"outputs"`
}

func (s *Server) metadata(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	man, ok := s.o.Models.Manifest(name)
	if !ok {
		s.notFound(w, name)
		return
	}
	md := ModelMetadata{Name: man.Name, Versions: []string{man.Version}, Platform: Platform}
	for _, in := range man.Inputs {
		md.Inputs = append(md.Inputs, tensor.Spec{Name: in.Name, Datatype: in.Datatype, Shape: in.Shape})
	}
	for _, out := range man.Outputs {
		md.Outputs = append(md.Outputs, tensor.Spec{Name: out.Name, Datatype: out.Datatype, Shape: out.Shape})
	}
	writeJSON(w, http.StatusOK, md)
}

func (s *Server) modelReady(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, ok := s.o.Models.Manifest(name); !ok {
		s.notFound(w, name)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"name": name, "ready": true})
}

func (s *Server) notFound(w http.ResponseWriter, name string) {
	s.rejected.notFound.Add(1)
	writeError(w, http.StatusNotFound, fmt.Sprintf("model %q is not active on this device; GET /v2/health/ready tells whether any model is", name))
}

// DecodeInferRequest reads an OIP inference request from body (at most max
// bytes) and converts its inputs to tensors.
func DecodeInferRequest(body io.Reader, max int64) (*tensor.InferRequest, []tensor.Tensor, error) {
	data, err := io.ReadAll(io.LimitReader(body, max+1))
	if err != nil {
		return nil, nil, err
	}
	if int64(len(data)) > max {
		return nil, nil, errTooLarge
	}
	req := &tensor.InferRequest{}
	if err := json.Unmarshal(data, req); err != nil {
		return nil, nil, fmt.Errorf("request body is not an inference request: %w", err)
	}
	if len(req.Inputs) == 0 {
		return nil, nil, fmt.Errorf("request has no inputs; send {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]}")
	}
	if len(req.Inputs) > maxInputs {
		return nil, nil, fmt.Errorf("request has %d inputs; the limit is %d", len(req.Inputs), maxInputs)
	}
	in := make([]tensor.Tensor, len(req.Inputs))
	for i, o := range req.Inputs {
		t, err := tensor.FromOIP(o)
		if err != nil {
			return nil, nil, err
		}
		in[i] = t
	}
	return req, in, nil
}

var errTooLarge = errors.New("request body too large")

func (s *Server) infer(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	req, in, err := DecodeInferRequest(r.Body, s.o.MaxBody)
	if errors.Is(err, errTooLarge) {
		s.rejected.tooLarge.Add(1)
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body is over %d bytes; send fewer rows per request", s.o.MaxBody))
		return
	}
	if err != nil {
		s.rejected.badRequest.Add(1)
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	res, err := s.o.Models.Infer(r.Context(), name, r.PathValue("version"), in)
	if errors.Is(err, deploy.ErrNoModel) {
		s.rejected.notFound.Add(1)
		writeError(w, http.StatusNotFound, fmt.Sprintf("%v; GET /v2/health/ready tells whether any model is", err))
		return
	}
	s.account(res.Model, res.Version, res.Latency, err)
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, host.ErrBadInput):
			code = http.StatusBadRequest
		case errors.Is(err, host.ErrTimeout):
			code = http.StatusGatewayTimeout
		case errors.Is(err, host.ErrClosed):
			code = http.StatusServiceUnavailable
		}
		s.log.Debug("inference failed", "model", res.Model, "version", res.Version, "err", err)
		writeError(w, code, err.Error())
		return
	}
	resp := tensor.InferResponse{ModelName: res.Model, ModelVersion: res.Version, ID: req.ID}
	want := map[string]bool{}
	for _, o := range req.Outputs {
		want[o.Name] = true
	}
	for _, t := range res.Outputs {
		if len(want) > 0 && !want[t.Name] {
			continue
		}
		o, err := tensor.ToOIP(t)
		if err != nil {
			writeError(w, http.StatusInternalServerError, fmt.Sprintf("model %s %s: %v", res.Model, res.Version, err))
			return
		}
		resp.Outputs = append(resp.Outputs, o)
	}
	writeJSON(w, http.StatusOK, resp)
}

// account counts the call for /metrics.
func (s *Server) account(model, version string, took time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := callKey{model, version}
	c := s.calls[k]
	if c == nil {
		c = &callStats{}
		s.calls[k] = c
	}
	if err != nil {
		c.failed++
	} else {
		c.ok++
	}
	c.latencySum += took
}

func (s *Server) metrics(w http.ResponseWriter, r *http.Request) {
	var b bytes.Buffer
	s.mu.Lock()
	keys := make([]callKey, 0, len(s.calls))
	for k := range s.calls {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		return keys[i].model < keys[j].model || keys[i].model == keys[j].model && keys[i].version < keys[j].version
	})
	b.WriteString("# HELP edgefleet_agent_inferences_total Inference calls by model, version and outcome.\n# TYPE edgefleet_agent_inferences_total counter\n")
	for _, k := range keys {
		c := s.calls[k]
		fmt.Fprintf(&b, "edgefleet_agent_inferences_total{model=%q,version=%q,outcome=\"ok\"} %d\n", label(k.model), label(k.version), c.ok)
		fmt.Fprintf(&b, "edgefleet_agent_inferences_total{model=%q,version=%q,outcome=\"error\"} %d\n", label(k.model), label(k.version), c.failed)
	}
	b.WriteString("# HELP edgefleet_agent_inference_seconds_sum Total time spent in inference calls.\n# TYPE edgefleet_agent_inference_seconds_sum counter\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "edgefleet_agent_inference_seconds_sum{model=%q,version=%q} %g\n", label(k.model), label(k.version), s.calls[k].latencySum.Seconds())
	}
	s.mu.Unlock()
	b.WriteString("# HELP edgefleet_agent_requests_rejected_total Requests refused before inference, by reason.\n# TYPE edgefleet_agent_requests_rejected_total counter\n")
	fmt.Fprintf(&b, "edgefleet_agent_requests_rejected_total{reason=\"too_large\"} %d\n", s.rejected.tooLarge.Load())
	fmt.Fprintf(&b, "edgefleet_agent_requests_rejected_total{reason=\"bad_request\"} %d\n", s.rejected.badRequest.Load())
	fmt.Fprintf(&b, "edgefleet_agent_requests_rejected_total{reason=\"not_found\"} %d\n", s.rejected.notFound.Load())
	ready := 0
	if s.o.Models.Ready() {
		ready = 1
	}
	fmt.Fprintf(&b, "# HELP edgefleet_agent_ready 1 when at least one model is active.\n# TYPE edgefleet_agent_ready gauge\nedgefleet_agent_ready %d\n", ready)
	if s.o.Metrics != nil {
		s.o.Metrics(&b)
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Write(b.Bytes())
}

// label keeps a label value printable; %q then quotes it the way the
// Prometheus text format expects for the characters model names can hold.
func label(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '_'
		}
		return r
	}, s)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}
