package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/edgefleet/edgefleet/controller/director"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

// Keys manages the signing keys: *director.Director.
type Keys interface {
	Keys() (director.KeysInfo, error)
	RotateDirectorKey(ctx context.Context, overlap time.Duration) (director.Announcement, error)
	AddAnnouncement(ctx context.Context, s *pb.SignedKeyAnnouncement) (director.Announcement, error)
}

// KeyAnnouncement is one key announcement as the API shows it.
type KeyAnnouncement struct {
	Role     string    `json:"role"`
	Sequence uint64    `json:"sequence"`
	KeyID    string    `json:"keyId"`
	SignedBy string    `json:"signedBy"`
	IssuedAt time.Time `json:"issuedAt"`
	// RetirePreviousAt is when the role's previous keys stop being
	// trusted; absent: when agents apply the announcement.
	RetirePreviousAt *time.Time `json:"retirePreviousAt,omitempty"`
}

// KeyList answers GET /v1/keys: the director key in use (its public half,
// PEM, is what new agents are given as --director-key) and every
// announcement, oldest first.
type KeyList struct {
	DirectorKeyID     string            `json:"directorKeyId"`
	DirectorPublicKey string            `json:"directorPublicKey"`
	Announcements     []KeyAnnouncement `json:"announcements"`
}

// RotateRequest is the body of POST /v1/keys/director/rotate. Overlap is
// how long the previous key stays trusted, a Go duration ("720h"); empty
// means the desired-state expiry (30 days), "0s" retires it at once.
type RotateRequest struct {
	Overlap string `json:"overlap,omitempty"`
}

func announcementJSON(a director.Announcement) KeyAnnouncement {
	out := KeyAnnouncement{Role: a.Role, Sequence: a.Sequence, KeyID: a.KeyID, SignedBy: a.SignedBy, IssuedAt: a.IssuedAt}
	if !a.RetirePreviousAt.IsZero() {
		r := a.RetirePreviousAt
		out.RetirePreviousAt = &r
	}
	return out
}

// routeKeys adds the key endpoints: GET /v1/keys (viewer: public keys
// are not secret), POST /v1/keys/director/rotate and POST
// /v1/keys/announcements (admin, audited; access.Required).
func (s *server) routeKeys(mux *http.ServeMux) {
	if s.Keys == nil {
		return
	}
	mux.HandleFunc("GET /v1/keys", s.listKeys)
	mux.HandleFunc("POST /v1/keys/director/rotate", s.rotateDirector)
	mux.HandleFunc("POST /v1/keys/announcements", s.pushAnnouncement)
}

func (s *server) listKeys(w http.ResponseWriter, r *http.Request) {
	info, err := s.Keys.Keys()
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	out := KeyList{DirectorKeyID: info.DirectorKeyID, DirectorPublicKey: string(info.DirectorPublicKey), Announcements: []KeyAnnouncement{}}
	for _, a := range info.Announcements {
		out.Announcements = append(out.Announcements, announcementJSON(a))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) rotateDirector(w http.ResponseWriter, r *http.Request) {
	noteTarget(r, "director key")
	var req RotateRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxJSONBody)).Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		writeError(w, http.StatusBadRequest, `body: want JSON like {"overlap":"720h"} or nothing: `+err.Error())
		return
	}
	var overlap time.Duration
	if req.Overlap != "" {
		d, err := time.ParseDuration(req.Overlap)
		if err != nil || d < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("overlap %q: want a duration such as 720h, or 0s to retire the old key at once", req.Overlap))
			return
		}
		overlap = d
		if d == 0 {
			overlap = -1 // at once
		}
	}
	a, err := s.Keys.RotateDirectorKey(r.Context(), overlap)
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	noteTarget(r, "director key %s -> %s (sequence %d)", a.SignedBy, a.KeyID, a.Sequence)
	writeJSON(w, http.StatusOK, announcementJSON(a))
}

func (s *server) pushAnnouncement(w http.ResponseWriter, r *http.Request) {
	noteTarget(r, "key announcement")
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, trust.MaxAnnouncement+256))
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body: %v; send one announcement file written by `fleet keys rotate-release`", err))
		return
	}
	var signed pb.SignedKeyAnnouncement
	if err := proto.Unmarshal(b, &signed); err != nil {
		writeError(w, http.StatusBadRequest, "body is not a signed key announcement (write one with `fleet keys rotate-release`): "+err.Error())
		return
	}
	if _, err := trust.DecodeAnnouncement(&signed); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	a, err := s.Keys.AddAnnouncement(r.Context(), &signed)
	if err != nil {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	noteTarget(r, "%s key %s (sequence %d, signed by %s)", a.Role, a.KeyID, a.Sequence, a.SignedBy)
	writeJSON(w, http.StatusCreated, announcementJSON(a))
}
