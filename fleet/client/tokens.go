package client

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// Token describes an API token; Secret is set only in the answer that
// created it.
type Token struct {
	Name      string     `json:"name"`
	Role      string     `json:"role"`
	CreatedBy string     `json:"createdBy"`
	CreatedAt time.Time  `json:"createdAt"`
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
	Secret    string     `json:"token,omitempty"`
}

// CreateToken makes a token with role viewer, operator or admin; it needs
// an admin token. The answer's Secret is shown this once.
func (c *Client) CreateToken(ctx context.Context, name, role string) (*Token, error) {
	var t Token
	if err := c.postJSON(ctx, "/v1/tokens", map[string]string{"name": name, "role": role}, &t); err != nil {
		return nil, err
	}
	return &t, nil
}

// Tokens lists the tokens, revoked ones included, without secrets.
func (c *Client) Tokens(ctx context.Context) ([]Token, error) {
	var out struct {
		Tokens []Token `json:"tokens"`
	}
	err := c.getJSON(ctx, "/v1/tokens", &out)
	return out.Tokens, err
}

// RevokeToken revokes the named token at once.
func (c *Client) RevokeToken(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/tokens/"+url.PathEscape(name), nil, "", nil)
}

// AuditEntry is one change attempted through the API.
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

// AuditQuery selects audit entries; zero values mean the defaults (the
// newest 100, everyone's).
type AuditQuery struct {
	Limit    int
	BeforeID int64
	Who      string
}

// Audit returns audit entries, newest first, and the BeforeID of the next
// (older) page, 0 when there is none.
func (c *Client) Audit(ctx context.Context, q AuditQuery) ([]AuditEntry, int64, error) {
	v := url.Values{}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	if q.BeforeID > 0 {
		v.Set("before", strconv.FormatInt(q.BeforeID, 10))
	}
	if q.Who != "" {
		v.Set("who", q.Who)
	}
	path := "/v1/audit"
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	var out struct {
		Entries []AuditEntry `json:"entries"`
		Next    int64        `json:"next"`
	}
	err := c.getJSON(ctx, path, &out)
	return out.Entries, out.Next, err
}
