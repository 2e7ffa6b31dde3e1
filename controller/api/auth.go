package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/access"
	"github.com/edgefleet/edgefleet/controller/store"
)

// Tokens authenticates and manages operator API tokens.
type Tokens interface {
	TokenByHash(ctx context.Context, hash string) (store.Token, error)
	CreateToken(ctx context.Context, t store.Token) (store.Token, error)
	Tokens(ctx context.Context) ([]store.Token, error)
	RevokeToken(ctx context.Context, name string) error
}

// AuditLog keeps the record of every change made through the API.
type AuditLog interface {
	AppendAudit(ctx context.Context, e store.AuditEntry) (store.AuditEntry, error)
	Audit(ctx context.Context, q store.AuditQuery) ([]store.AuditEntry, error)
}

// Caller is who made a request: the token's name and role.
type Caller struct {
	Name string
	Role access.Role
}

type callerKey struct{}

// auditNote is where a handler leaves what its change acted on.
type auditNote struct{ target string }

type auditKey struct{}

// CallerFrom returns the caller of an authenticated request.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// noteTarget records, for the audit log, what the request's change acts
// on (a model, a selector, a rollout). Without a note the entry names the
// request's path.
func noteTarget(r *http.Request, format string, a ...any) {
	if n, ok := r.Context().Value(auditKey{}).(*auditNote); ok {
		n.target = fmt.Sprintf(format, a...)
	}
}

// guard authenticates every request that access.Required says needs a
// role, refuses callers below it, and writes each request that may change
// something (any method but GET and HEAD) to the audit log: who, role,
// what, target, when and the outcome, refusals of known callers included.
// Requests with no valid token are answered 401 and logged, not audited:
// anyone who can reach the port could otherwise fill the log.
func (s *server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		need := access.Required(r.Method, r.URL.Path)
		if need == access.None {
			next.ServeHTTP(w, r)
			return
		}
		caller, err := s.authenticate(r)
		if err != nil {
			s.log.Warn("api request without a valid token", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
			w.Header().Set("WWW-Authenticate", `Bearer realm="edgefleet"`)
			writeError(w, http.StatusUnauthorized, fmt.Sprintf("%s %s needs an API token with role %s or higher: %v", r.Method, r.URL.Path, need, err))
			return
		}
		ctx := context.WithValue(r.Context(), callerKey{}, caller)
		changes := r.Method != http.MethodGet && r.Method != http.MethodHead
		if caller.Role < need {
			msg := fmt.Sprintf("token %q has role %s; %s %s needs role %s or higher (ask an admin for a token with that role: fleet token create --role %s)",
				caller.Name, caller.Role, r.Method, r.URL.Path, need, need)
			writeError(w, http.StatusForbidden, msg)
			if changes {
				s.audit(ctx, caller, r.Method+" "+r.URL.Path, r.URL.Path, http.StatusForbidden, "denied: "+msg)
			}
			return
		}
		if !changes {
			next.ServeHTTP(w, r.WithContext(ctx))
			return
		}
		note := &auditNote{}
		r = r.WithContext(context.WithValue(ctx, auditKey{}, note))
		cw := &captureWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(cw, r)
		// ServeMux sets Pattern on the request it routes, this one.
		action := r.Pattern
		if action == "" || !strings.Contains(action, " ") {
			action = r.Method + " " + r.URL.Path
		}
		target := note.target
		if target == "" {
			target = r.URL.Path
		}
		s.audit(ctx, caller, action, target, cw.status, cw.result())
	})
}

// authenticate returns the caller named by the request's bearer token.
func (s *server) authenticate(r *http.Request) (Caller, error) {
	secret := access.BearerToken(r)
	if secret == "" {
		return Caller{}, errors.New("no token given; pass --token or set EDGEFLEET_TOKEN (a new controller writes its first admin token to DATA/admin.token)")
	}
	if s.Tokens == nil {
		return Caller{}, errors.New("this API has no token store, so no token is valid")
	}
	t, err := s.Tokens.TokenByHash(r.Context(), access.Hash(secret))
	if errors.Is(err, store.ErrNotFound) {
		return Caller{}, errors.New("the token is unknown or revoked; check --token / EDGEFLEET_TOKEN")
	}
	if err != nil {
		return Caller{}, fmt.Errorf("tokens cannot be checked now: %w", err)
	}
	role, err := access.ParseRole(t.Role)
	if err != nil {
		return Caller{}, fmt.Errorf("token %q has an invalid stored role: %w", t.Name, err)
	}
	return Caller{Name: t.Name, Role: role}, nil
}

// audit appends one entry. A failure is logged: the change it records has
// already happened, and the log line keeps its trace.
func (s *server) audit(ctx context.Context, c Caller, action, target string, status int, result string) {
	e := store.AuditEntry{At: time.Now().UTC(), Who: c.Name, Role: c.Role.String(), Action: action, Target: target, Status: status, Result: result}
	if s.Audit == nil {
		s.log.Error("no audit log configured; change not recorded", "who", e.Who, "action", e.Action, "target", e.Target, "status", e.Status)
		return
	}
	if _, err := s.Audit.AppendAudit(context.WithoutCancel(ctx), e); err != nil {
		s.log.Error("audit log write failed", "who", e.Who, "role", e.Role, "action", e.Action, "target", e.Target, "status", e.Status, "result", e.Result, "err", err)
	}
}

// maxErrorCapture bounds how much of an error answer is kept for the
// audit log's result.
const maxErrorCapture = 2048

// captureWriter records the status and the start of an error answer.
type captureWriter struct {
	http.ResponseWriter
	status int
	body   bytes.Buffer
}

func (w *captureWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *captureWriter) Write(p []byte) (int, error) {
	if w.status >= 400 && w.body.Len() < maxErrorCapture {
		w.body.Write(p[:min(len(p), maxErrorCapture-w.body.Len())])
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the connection.
func (w *captureWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *captureWriter) result() string {
	if w.status < 400 {
		return "ok"
	}
	var e Error
	msg := strings.TrimSpace(w.body.String())
	if json.Unmarshal(w.body.Bytes(), &e) == nil && e.Error != "" {
		msg = e.Error
	}
	return fmt.Sprintf("failed (%d): %s", w.status, msg)
}
