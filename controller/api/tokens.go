package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/edgefleet/edgefleet/controller/access"
	"github.com/edgefleet/edgefleet/controller/store"
)

// TokenRequest is the body of POST /v1/tokens.
type TokenRequest struct {
	Name string `json:"name"`
	Role string `json:"role"`
}

// TokenInfo describes a token without its secret.
type TokenInfo struct {
	Name      string     `json:"name"`
	Role      string     `json:"role"`
	CreatedBy string     `json:"createdBy"`
	CreatedAt time.Time  `json:"createdAt"`
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
}

// TokenCreated answers POST /v1/tokens. Token is the secret: it is shown
// this once and never stored.
type TokenCreated struct {
	TokenInfo
	Token string `json:"token"`
}

// TokenList answers GET /v1/tokens.
type TokenList struct {
	Tokens []TokenInfo `json:"tokens"`
}

// AuditEntry is one entry of the audit log.
type AuditEntry struct {
	ID     int64     `json:"id"`
	At     time.Time `json:"at"`
	Who    string    `json:"who"`
	Role   string    `json:"role"`
	Action string    `json:"action"`
	Target string    `json:"target"`
	Status int       `json:"status"`
	Result string    `json:"result"`
}

// AuditList answers GET /v1/audit, newest first. Next, when not zero, is
// the before= value of the next (older) page.
type AuditList struct {
	Entries []AuditEntry `json:"entries"`
	Next    int64        `json:"next,omitempty"`
}

func tokenJSON(t store.Token) TokenInfo {
	out := TokenInfo{Name: t.Name, Role: t.Role, CreatedBy: t.CreatedBy, CreatedAt: t.CreatedAt}
	if !t.RevokedAt.IsZero() {
		r := t.RevokedAt
		out.RevokedAt = &r
	}
	return out
}

func (s *server) createToken(w http.ResponseWriter, r *http.Request) {
	var req TokenRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxJSONBody)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, `body: want JSON like {"name":"ci","role":"operator"}: `+err.Error())
		return
	}
	noteTarget(r, "token %s (%s)", req.Name, req.Role)
	if err := access.ValidateName(req.Name); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	role, err := access.ParseRole(req.Role)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	secret, err := access.NewToken()
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	caller, _ := CallerFrom(r.Context())
	t, err := s.Tokens.CreateToken(r.Context(), store.Token{Name: req.Name, Role: role.String(), Hash: access.Hash(secret), CreatedBy: caller.Name})
	if errors.Is(err, store.ErrConflict) {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, TokenCreated{TokenInfo: tokenJSON(t), Token: secret})
}

func (s *server) listTokens(w http.ResponseWriter, r *http.Request) {
	ts, err := s.Tokens.Tokens(r.Context())
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	out := TokenList{Tokens: []TokenInfo{}}
	for _, t := range ts {
		out.Tokens = append(out.Tokens, tokenJSON(t))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) revokeToken(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	noteTarget(r, "token %s", name)
	ts, err := s.Tokens.Tokens(r.Context())
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	// Revoking the last valid admin token would leave nobody able to
	// make tokens; refuse instead of locking the fleet's admins out.
	admins, isAdmin := 0, false
	for _, t := range ts {
		if t.RevokedAt.IsZero() && t.Role == access.Admin.String() {
			admins++
			isAdmin = isAdmin || t.Name == name
		}
	}
	if isAdmin && admins == 1 {
		writeError(w, http.StatusConflict, fmt.Sprintf("token %q is the last valid admin token; create another admin token first", name))
		return
	}
	err = s.Tokens.RevokeToken(r.Context(), name)
	if errors.Is(err, store.ErrNotFound) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no valid token is named %q; list them with GET /v1/tokens", name))
		return
	}
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"name": name, "revoked": true})
}

func (s *server) listAudit(w http.ResponseWriter, r *http.Request) {
	q := store.AuditQuery{Who: r.URL.Query().Get("who")}
	if v := r.URL.Query().Get("before"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("before=%q: want a non-negative entry id", v))
			return
		}
		q.BeforeID = n
	}
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > store.MaxAuditPage {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("limit=%q: want 1 to %d", v, store.MaxAuditPage))
			return
		}
		q.Limit = n
	}
	if q.Limit == 0 {
		q.Limit = 100
	}
	es, err := s.Audit.Audit(r.Context(), q)
	if err != nil {
		s.internalError(w, r, err)
		return
	}
	out := AuditList{Entries: []AuditEntry{}}
	for _, e := range es {
		out.Entries = append(out.Entries, AuditEntry{ID: e.ID, At: e.At, Who: e.Who, Role: e.Role, Action: e.Action, Target: e.Target, Status: e.Status, Result: e.Result})
	}
	if len(es) == q.Limit {
		out.Next = es[len(es)-1].ID
	}
	writeJSON(w, http.StatusOK, out)
}
