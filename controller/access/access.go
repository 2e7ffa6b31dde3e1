// Package access decides who may use the controller's API. Operators
// authenticate with bearer tokens that carry a role; Required says which
// role each request needs; Bootstrap gives a fresh controller its first
// admin token, written to a file only its owner can read.
//
// Roles are ordered, each including the ones below it:
//
//	viewer    read the fleet: devices, models, rollouts, the audit log
//	operator  change it: push models, assign, start and steer rollouts
//	admin     change who may: API tokens, keys
//
// Tokens are 32 random bytes; the controller stores only their SHA-256,
// so a copy of its database grants nothing. A token is unguessable, so a
// plain hash (no salt, no stretching) is enough: stretching protects
// low-entropy passwords, not random keys.
package access

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/edgefleet/edgefleet/controller/store"
)

// Role is what a token may do. The zero value, None, may do nothing that
// needs a token.
type Role int

// Roles, in increasing power.
const (
	None Role = iota
	Viewer
	Operator
	Admin
)

var roleNames = []string{"none", "viewer", "operator", "admin"}

func (r Role) String() string {
	if r < None || int(r) >= len(roleNames) {
		return fmt.Sprintf("Role(%d)", int(r))
	}
	return roleNames[r]
}

// ParseRole parses viewer, operator or admin.
func ParseRole(s string) (Role, error) {
	for i, n := range roleNames {
		if i > 0 && s == n {
			return Role(i), nil
		}
	}
	return None, fmt.Errorf("role %q: choose viewer, operator or admin", s)
}

// TokenPrefix starts every token, so a leaked one is easy to recognise
// (and to search for in logs and repositories).
const TokenPrefix = "eft_"

// NewToken returns a fresh token secret: TokenPrefix and 32 random bytes,
// base64url.
func NewToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	return TokenPrefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// MaxTokenLen caps what is hashed from an Authorization header.
const MaxTokenLen = 256

// Hash returns the stored form of a token secret: its SHA-256, hex.
func Hash(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateName checks a token name: 1 to 64 letters, digits, '.', '_' or
// '-', starting with a letter or digit. Names appear in the audit log.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("token name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// Required returns the least role a request needs; None means the
// endpoint is public. The policy goes by method and path, before routing,
// so an endpoint added later is covered without saying so: a read needs a
// viewer, any other method an operator, and everything about tokens, and
// every change to keys, an admin.
//
// Public: the health check, Prometheus metrics (scrapers rarely carry
// tokens; the API binds to loopback by default), and artifact downloads,
// which agents make without a token: bundles are content-addressed, and
// their signature, not the download, is what agents trust.
func Required(method, p string) Role {
	p = path.Clean("/" + p)
	read := method == http.MethodGet || method == http.MethodHead
	switch {
	case read && (p == "/healthz" || p == "/metrics" || strings.HasPrefix(p, "/v1/artifacts/")):
		return None
	case read && under(p, "/v1/keys"):
		// Public keys and announcements are not secrets; reading them
		// lets anyone check what agents should trust.
		return Viewer
	case under(p, "/v1/tokens"), under(p, "/v1/keys"):
		return Admin
	case read:
		return Viewer
	}
	return Operator
}

func under(p, prefix string) bool {
	return p == prefix || strings.HasPrefix(p, prefix+"/")
}

// AdminTokenFile is the file in the controller's data directory that
// holds the first admin token.
const AdminTokenFile = "admin.token"

// BootstrapName is the name of the first admin token.
const BootstrapName = "admin"

// Bootstrapper is the part of the store Bootstrap needs.
type Bootstrapper interface {
	CountTokens(ctx context.Context) (int, error)
	CreateToken(ctx context.Context, t store.Token) (store.Token, error)
}

// Bootstrap gives a controller with no tokens at all its first admin
// token, written to dataDir/admin.token with mode 0600, and returns the
// file's path and true. With tokens already there it does nothing: a
// deleted admin.token is not recreated, so removing the file after
// handing its token over is safe.
//
// The file is written before the token is stored: if storing fails, the
// next start writes a new file, while the other order could leave a stored
// admin token nobody has.
func Bootstrap(ctx context.Context, st Bootstrapper, dataDir string) (string, bool, error) {
	n, err := st.CountTokens(ctx)
	if err != nil {
		return "", false, fmt.Errorf("count API tokens: %w", err)
	}
	if n > 0 {
		return "", false, nil
	}
	secret, err := NewToken()
	if err != nil {
		return "", false, err
	}
	p := filepath.Join(dataDir, AdminTokenFile)
	if err := writeSecret(p, secret+"\n"); err != nil {
		return "", false, fmt.Errorf("write the first admin token: %w", err)
	}
	if _, err := st.CreateToken(ctx, store.Token{Name: BootstrapName, Role: Admin.String(), Hash: Hash(secret), CreatedBy: "controller first start"}); err != nil {
		return "", false, fmt.Errorf("store the first admin token: %w", err)
	}
	return p, true, nil
}

// writeSecret replaces p atomically with a file only its owner can read.
func writeSecret(p, content string) error {
	f, err := os.CreateTemp(filepath.Dir(p), ".admin.token-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), p)
}

// BearerToken returns the token of an "Authorization: Bearer ..." header,
// or "" when there is none. A token longer than MaxTokenLen is returned
// cut, so it fails to authenticate without costing a hash of megabytes.
func BearerToken(r *http.Request) string {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	tok = strings.TrimSpace(tok)
	if len(tok) > MaxTokenLen {
		tok = tok[:MaxTokenLen]
	}
	return tok
}
