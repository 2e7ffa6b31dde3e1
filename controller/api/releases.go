package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"

	"github.com/edgefleet/edgefleet/controller/registry"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/release"
)

// Agent release endpoints:
//
//	POST /v1/agent/releases        multipart/form-data: part "release" (the signed release
//	                               document, `fleet agent release push` makes it), then part
//	                               "binary" (the agent binary) -> 201 AgentRelease (200 if
//	                               stored already, 400 malformed or not matching, 409 clash)
//	GET  /v1/agent/releases        AgentReleaseList
//	GET  /v1/artifacts/agent-releases/{version}/{os}/{arch}
//	                               the signed release document; public like every artifact
//	                               (agents fetch it without a token and check its signature)

// Releases stores and serves agent releases.
type Releases interface {
	PushRelease(ctx context.Context, doc []byte, bin io.Reader) (registry.Release, bool, error)
	Release(version, goos, goarch string) (registry.Release, error)
	Releases(ctx context.Context) ([]registry.Release, error)
}

// AgentReleaseList is the answer of GET /v1/agent/releases.
type AgentReleaseList struct {
	Releases []registry.Release `json:"releases"`
}

func (s *server) routeReleases(mux *http.ServeMux) {
	if s.Releases == nil {
		return
	}
	mux.HandleFunc("POST /v1/agent/releases", s.pushRelease)
	mux.HandleFunc("GET /v1/agent/releases", s.listReleases)
	mux.HandleFunc("GET /v1/artifacts/agent-releases/{version}/{os}/{arch}", s.releaseDocument)
}

func (s *server) pushRelease(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, release.MaxBinary+release.MaxDocument+64<<10)
	mr, err := r.MultipartReader()
	if err != nil {
		writeError(w, http.StatusBadRequest, "send multipart/form-data with a \"release\" part (the signed document) and then a \"binary\" part: "+err.Error())
		return
	}
	doc, err := readPart(mr, "release", release.MaxDocument)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	bin, err := mr.NextPart()
	if err != nil || bin.FormName() != "binary" {
		writeError(w, http.StatusBadRequest, "the part after \"release\" must be \"binary\", the agent binary's bytes")
		return
	}
	defer bin.Close()
	noteTarget(r, "agent release document of %d bytes", len(doc))
	rel, created, err := s.Releases.PushRelease(r.Context(), doc, bin)
	if err == nil {
		m := rel.Manifest
		noteTarget(r, "agent release %s %s sha256:%s", m.Version, m.Platform(), m.SHA256)
	}
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("agent binary is over the %d byte limit", release.MaxBinary))
	case errors.Is(err, release.ErrInvalid):
		writeError(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, store.ErrConflict):
		writeError(w, http.StatusConflict, err.Error())
	case err != nil:
		s.internalError(w, r, err)
	case created:
		writeJSON(w, http.StatusCreated, rel)
	default:
		writeJSON(w, http.StatusOK, rel)
	}
}

func readPart(mr *multipart.Reader, name string, limit int64) ([]byte, error) {
	p, err := mr.NextPart()
	if err != nil {
		return nil, fmt.Errorf("missing part %q: %v", name, err)
	}
	defer p.Close()
	if p.FormName() != name {
		return nil, fmt.Errorf("first part is %q; send %q first", p.FormName(), name)
	}
	b, err := io.ReadAll(io.LimitReader(p, limit+1))
	if err != nil {
		return nil, fmt.Errorf("part %q: %v", name, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("part %q is over the %d byte limit", name, limit)
	}
	return b, nil
}

func (s *server) listReleases(w http.ResponseWriter, r *http.Request) {
	rels, err := s.Releases.Releases(r.Context())
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	if rels == nil {
		rels = []registry.Release{}
	}
	writeJSON(w, http.StatusOK, AgentReleaseList{Releases: rels})
}

func (s *server) releaseDocument(w http.ResponseWriter, r *http.Request) {
	rel, err := s.Releases.Release(r.PathValue("version"), r.PathValue("os"), r.PathValue("arch"))
	if errors.Is(err, registry.ErrReleaseNotFound) {
		writeError(w, http.StatusNotFound, err.Error())
		return
	}
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(rel.Document)
}
