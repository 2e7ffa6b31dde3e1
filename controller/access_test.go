package controller

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/api"
)

// createToken makes a token with the admin token and returns its secret.
func (h *harness) createToken(name, role string) string {
	h.t.Helper()
	var out api.TokenCreated
	h.call("POST", "/v1/tokens", []byte(`{"name":"`+name+`","role":"`+role+`"}`), http.StatusCreated, &out)
	if out.Name != name || out.Role != role || !strings.HasPrefix(out.Token, "eft_") {
		h.t.Fatalf("created token %+v", out)
	}
	return out.Token
}

// as does a request with the given token ("" for none) and checks the
// status; it returns the error message of an error answer.
func (h *harness) as(token, method, path, body string, wantStatus int) string {
	h.t.Helper()
	hdr := map[string]string{"Authorization": ""}
	if token != "" {
		hdr["Authorization"] = "Bearer " + token
	}
	resp, b := h.do(method, path, []byte(body), hdr)
	if resp.StatusCode != wantStatus {
		h.t.Fatalf("%s %s: status %d, want %d; body %s", method, path, resp.StatusCode, wantStatus, b)
	}
	return string(b)
}

// TestAPIRolesAndAudit: a viewer reads but cannot assign or start a
// rollout; an operator can; each change, refused or not, is in the audit
// log with who, role and when; tokens without a role are refused.
func TestAPIRolesAndAudit(t *testing.T) {
	f := startRolloutFleet(t)
	f.addAgents(2, "sec", all, nil)
	began := time.Now().Add(-time.Second)
	viewer := f.createToken("alice", "viewer")
	operator := f.createToken("ci", "operator")

	// Without a token only the public endpoints answer.
	f.as("", "GET", "/healthz", "", http.StatusOK)
	f.as("", "GET", "/v1/artifacts/"+f.digests["1.0.0"], "", http.StatusOK)
	if msg := f.as("", "GET", "/v1/devices", "", http.StatusUnauthorized); !strings.Contains(msg, "needs an API token with role viewer") {
		t.Fatalf("no token: %s", msg)
	}
	f.as("", "POST", "/v1/assignments", `{"model":"m","version":"2.0.0","selector":"fleet=a"}`, http.StatusUnauthorized)
	f.as("eft_forged", "POST", "/v1/assignments", `{"model":"m","version":"2.0.0","selector":"fleet=a"}`, http.StatusUnauthorized)

	// The viewer reads everything but changes nothing.
	f.as(viewer, "GET", "/v1/devices", "", http.StatusOK)
	f.as(viewer, "GET", "/v1/rollouts", "", http.StatusOK)
	for _, c := range []struct{ path, body string }{
		{"/v1/assignments", `{"model":"m","version":"2.0.0","selector":"fleet=a"}`},
		{"/v1/rollouts", `{"name":"by-viewer","selector":"fleet=a","model":"m@2.0.0","strategy":{"waves":["100%"],"soak":"50ms"}}`},
		{"/v1/models", "bundle"},
	} {
		msg := f.as(viewer, "POST", c.path, c.body, http.StatusForbidden)
		if !strings.Contains(msg, `token \"alice\" has role viewer`) || !strings.Contains(msg, "needs role operator") {
			t.Errorf("viewer POST %s: %s", c.path, msg)
		}
	}
	f.as(viewer, "POST", "/v1/tokens", `{"name":"x","role":"admin"}`, http.StatusForbidden)
	var none api.RolloutList
	f.call("GET", "/v1/rollouts", nil, http.StatusOK, &none)
	if len(none.Rollouts) != 0 {
		t.Fatalf("a viewer's refused request created rollouts: %+v", none.Rollouts)
	}

	// The operator assigns and starts a rollout, but manages no tokens.
	f.as(operator, "POST", "/v1/assignments", `{"model":"m","version":"1.0.0","selector":"fleet=a"}`, http.StatusOK)
	f.as(operator, "POST", "/v1/rollouts", `{"name":"by-ci","selector":"fleet=a","model":"m@2.0.0","strategy":{"waves":["100%"],"soak":"1h"}}`, http.StatusCreated)
	f.as(operator, "POST", "/v1/rollouts/by-ci/pause", "", http.StatusOK)
	f.as(operator, "GET", "/v1/tokens", "", http.StatusForbidden)

	// The audit log, readable by a viewer, has every change with who,
	// role, what, on what and when, newest first.
	var audit api.AuditList
	if err := json.Unmarshal([]byte(f.as(viewer, "GET", "/v1/audit?limit=50", "", http.StatusOK)), &audit); err != nil {
		t.Fatal(err)
	}
	type key struct{ who, role, action string }
	found := map[key]api.AuditEntry{}
	for _, e := range audit.Entries {
		if e.At.Before(began) || e.At.After(time.Now().Add(time.Second)) {
			t.Errorf("entry %d at %s, outside the test", e.ID, e.At)
		}
		if _, ok := found[key{e.Who, e.Role, e.Action}]; !ok { // keep the newest
			found[key{e.Who, e.Role, e.Action}] = e
		}
	}
	want := []struct {
		key
		status int
		target string
	}{
		{key{"admin", "admin", "POST /v1/tokens"}, http.StatusCreated, "token ci (operator)"},
		{key{"alice", "viewer", "POST /v1/assignments"}, http.StatusForbidden, "/v1/assignments"},
		{key{"alice", "viewer", "POST /v1/rollouts"}, http.StatusForbidden, "/v1/rollouts"},
		{key{"ci", "operator", "POST /v1/assignments"}, http.StatusOK, `m@1.0.0 slot default selector "fleet=a"`},
		{key{"ci", "operator", "POST /v1/rollouts"}, http.StatusCreated, ""},
		{key{"ci", "operator", "POST /v1/rollouts/{id}/{action}"}, http.StatusOK, "/v1/rollouts/by-ci/pause"},
	}
	for _, w := range want {
		e, ok := found[w.key]
		if !ok {
			t.Errorf("no audit entry for %+v in %+v", w.key, audit.Entries)
			continue
		}
		if e.Status != w.status || (w.target != "" && e.Target != w.target) {
			t.Errorf("audit entry %+v: want status %d, target %q", e, w.status, w.target)
		}
		if w.status >= 400 && !strings.HasPrefix(e.Result, "denied: ") {
			t.Errorf("refused change recorded as %q", e.Result)
		}
		if w.status < 400 && e.Result != "ok" {
			t.Errorf("change recorded as %q", e.Result)
		}
	}
	// Reads and requests without a valid token are not audited.
	for _, e := range audit.Entries {
		if e.Who == "" || strings.HasPrefix(e.Action, "GET ") {
			t.Errorf("unexpected audit entry %+v", e)
		}
	}
	var ci api.AuditList
	f.call("GET", "/v1/audit?who=ci", nil, http.StatusOK, &ci)
	if len(ci.Entries) != 3 {
		t.Fatalf("ci's audit entries: %+v", ci.Entries)
	}

	// Revoking takes effect at once; the last admin stays.
	f.call("DELETE", "/v1/tokens/ci", nil, http.StatusOK, nil)
	f.as(operator, "GET", "/v1/devices", "", http.StatusUnauthorized)
	f.apiError("DELETE", "/v1/tokens/admin", nil, http.StatusConflict, "last valid admin token")
	f.apiError("POST", "/v1/tokens", []byte(`{"name":"ci","role":"viewer"}`), http.StatusConflict, "taken")
	f.apiError("POST", "/v1/tokens", []byte(`{"name":"root","role":"god"}`), http.StatusBadRequest, "viewer, operator or admin")
	var tl api.TokenList
	f.call("GET", "/v1/tokens", nil, http.StatusOK, &tl)
	if len(tl.Tokens) != 3 || strings.Contains(f.as(f.adminToken(), "GET", "/v1/tokens", "", http.StatusOK), "eft_") {
		t.Fatalf("token list %+v (must hold no secrets)", tl)
	}
}

func TestWarnExposed(t *testing.T) {
	cases := []struct {
		name    string
		mutate  func(*Config)
		mqttTLS bool
		want    []string
	}{
		{"defaults", func(*Config) {}, false, nil},
		{"localhost", func(c *Config) { c.HTTPListen = "localhost:8080"; c.MQTTListen = "[::1]:1883" }, false, nil},
		{"public broker without TLS", func(c *Config) { c.MQTTListen = "0.0.0.0:1883" }, false, []string{"INSECURE: the embedded MQTT broker"}},
		{"public broker with TLS", func(c *Config) { c.MQTTListen = "0.0.0.0:8883" }, true, nil},
		{"external broker", func(c *Config) { c.Broker = "tcp://10.0.0.5:1883"; c.MQTTListen = "0.0.0.0:1883" }, false, nil},
		{"public API", func(c *Config) { c.HTTPListen = ":8080" }, false, []string{"INSECURE: the API"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var buf strings.Builder
			cfg := DefaultConfig()
			c.mutate(&cfg)
			warnExposed(slog.New(slog.NewTextHandler(&buf, nil)), cfg, c.mqttTLS)
			got := buf.String()
			if len(c.want) == 0 && got != "" {
				t.Fatalf("warned: %s", got)
			}
			for _, w := range c.want {
				if !strings.Contains(got, w) {
					t.Errorf("log %q lacks %q", got, w)
				}
			}
		})
	}
}
