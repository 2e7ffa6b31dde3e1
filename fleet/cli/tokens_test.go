package cli

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAPI stands in for the controller at the HTTP edge: it checks the
// bearer token and answers the token and audit endpoints.
type fakeAPI struct {
	mu   sync.Mutex
	seen []string // "METHOD path?query body"
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body map[string]string
	_ = json.NewDecoder(r.Body).Decode(&body)
	b, _ := json.Marshal(body)
	f.mu.Lock()
	f.seen = append(f.seen, r.Method+" "+r.URL.RequestURI()+" "+string(b))
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if r.Header.Get("Authorization") != "Bearer eft_admin" {
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error":"POST /v1/tokens needs an API token with role admin or higher"}`))
		return
	}
	switch r.Method + " " + r.URL.Path {
	case "POST /v1/tokens":
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(map[string]any{"name": body["name"], "role": body["role"], "createdBy": "admin", "createdAt": time.Now(), "token": "eft_new-secret"})
	case "GET /v1/tokens":
		json.NewEncoder(w).Encode(map[string]any{"tokens": []map[string]any{{"name": "admin", "role": "admin", "createdAt": time.Now()}, {"name": "ci", "role": "operator", "createdAt": time.Now(), "revokedAt": time.Now()}}})
	case "DELETE /v1/tokens/ci":
		json.NewEncoder(w).Encode(map[string]any{"name": "ci", "revoked": true})
	case "GET /v1/audit":
		json.NewEncoder(w).Encode(map[string]any{"entries": []map[string]any{{"id": 7, "at": time.Now(), "who": "ci", "role": "operator", "action": "POST /v1/assignments", "target": "m@1 slot default", "status": 200, "result": "ok"}}, "next": 7})
	default:
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"error":"no such endpoint"}`))
	}
}

func TestTokenAndAuditCommands(t *testing.T) {
	api := &fakeAPI{}
	srv := httptest.NewServer(api)
	defer srv.Close()
	t.Setenv("EDGEFLEET_CONTROLLER", srv.URL)
	t.Setenv("EDGEFLEET_TOKEN", "eft_admin")

	code, stdout, stderr := run(t, "token", "create", "--name", "ci", "--role", "operator")
	if code != 0 || stdout != "eft_new-secret\n" || !strings.Contains(stderr, "shown only now") {
		t.Fatalf("token create: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	if code, stdout, _ := run(t, "token", "list"); code != 0 || !strings.Contains(stdout, "ci") || !strings.Contains(stdout, "operator") {
		t.Fatalf("token list: %d %q", code, stdout)
	}
	if code, stdout, _ := run(t, "token", "revoke", "ci"); code != 0 || !strings.Contains(stdout, `token "ci" revoked`) {
		t.Fatalf("token revoke: %d %q", code, stdout)
	}
	code, stdout, _ = run(t, "audit", "--who", "ci", "--limit", "1")
	if code != 0 || !strings.Contains(stdout, "POST /v1/assignments") || !strings.Contains(stdout, "fleet audit --before 7") {
		t.Fatalf("audit: %d %q", code, stdout)
	}
	var out struct {
		Entries []struct{ Who string } `json:"entries"`
	}
	if code, stdout, _ := run(t, "audit", "-o", "json"); code != 0 || json.Unmarshal([]byte(stdout), &out) != nil || len(out.Entries) != 1 || out.Entries[0].Who != "ci" {
		t.Fatalf("audit -o json: %d %q", code, stdout)
	}
	want := []string{
		`POST /v1/tokens {"name":"ci","role":"operator"}`,
		"GET /v1/tokens null",
		"DELETE /v1/tokens/ci null",
		"GET /v1/audit?limit=1&who=ci null",
	}
	for i, w := range want {
		if api.seen[i] != w {
			t.Errorf("request %d = %q, want %q", i, api.seen[i], w)
		}
	}

	// A wrong token: the controller's message reaches the user.
	code, _, stderr = run(t, "token", "list", "--token", "eft_wrong")
	if code != 1 || !strings.Contains(stderr, "401") || !strings.Contains(stderr, "needs an API token") {
		t.Fatalf("wrong token: exit %d %q", code, stderr)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"token"}, "want: fleet token create"},
		{[]string{"token", "create", "--name", "x"}, "needs --name and --role"},
		{[]string{"token", "revoke"}, "want one token NAME"},
		{[]string{"token", "rotate"}, `unknown token subcommand "rotate"`},
		{[]string{"audit", "--limit", "0"}, "want 1 to 1000"},
	} {
		if code, _, stderr := run(t, c.args...); code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("fleet %s: exit %d %q, want usage error %q", strings.Join(c.args, " "), code, stderr, c.want)
		}
	}
}

func TestCertsBrokerAndReservedNames(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	if code, _, stderr := run(t, "certs", "init", "--dir", dir); code != 0 {
		t.Fatalf("certs init: %s", stderr)
	}
	for _, id := range []string{ControllerCN, BrokerCN} {
		if code, _, stderr := run(t, "certs", "device", id, "--dir", dir); code != 1 || !strings.Contains(stderr, "reserved") {
			t.Errorf("certs device %s: exit %d %q", id, code, stderr)
		}
	}
	if code, _, stderr := run(t, "certs", "broker", "--dir", dir); code != 2 || !strings.Contains(stderr, "--host") {
		t.Fatalf("certs broker without --host: exit %d %q", code, stderr)
	}
	if code, _, stderr := run(t, "certs", "broker", "--dir", dir, "--host", "mqtt.example", "--host", "10.1.2.3"); code != 0 {
		t.Fatalf("certs broker: %s", stderr)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "broker.crt"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(raw)
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if leaf.Subject.CommonName != BrokerCN || len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth ||
		len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "mqtt.example" || len(leaf.IPAddresses) != 1 {
		t.Fatalf("broker certificate: CN %q usage %v names %v %v; want a server-only certificate for its hosts", leaf.Subject.CommonName, leaf.ExtKeyUsage, leaf.DNSNames, leaf.IPAddresses)
	}
}
