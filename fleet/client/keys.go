package client

import (
	"bytes"
	"context"
	"net/http"
	"time"
)

// KeyAnnouncement is one key announcement (see controller/api.KeyAnnouncement).
type KeyAnnouncement struct {
	Role             string     `json:"role"`
	Sequence         uint64     `json:"sequence"`
	KeyID            string     `json:"keyId"`
	SignedBy         string     `json:"signedBy"`
	IssuedAt         time.Time  `json:"issuedAt"`
	RetirePreviousAt *time.Time `json:"retirePreviousAt,omitempty"`
}

// KeyList is the controller's director key and every announcement.
type KeyList struct {
	DirectorKeyID     string            `json:"directorKeyId"`
	DirectorPublicKey string            `json:"directorPublicKey"`
	Announcements     []KeyAnnouncement `json:"announcements"`
}

// Keys lists the director key in use and every key announcement (viewer).
func (c *Client) Keys(ctx context.Context) (*KeyList, error) {
	var out KeyList
	if err := c.getJSON(ctx, "/v1/keys", &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// LastSequence returns the sequence of role's last announcement (0: none).
func (l *KeyList) LastSequence(role string) uint64 {
	var seq uint64
	for _, a := range l.Announcements {
		if a.Role == role && a.Sequence > seq {
			seq = a.Sequence
		}
	}
	return seq
}

// RotateDirectorKey makes the controller rotate its director key (admin).
// overlap is how long the old key stays trusted ("" for the default, "0s"
// for at once).
func (c *Client) RotateDirectorKey(ctx context.Context, overlap string) (*KeyAnnouncement, error) {
	var out KeyAnnouncement
	if err := c.postJSON(ctx, "/v1/keys/director/rotate", map[string]string{"overlap": overlap}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// PushAnnouncement uploads a signed key announcement (the file `fleet keys
// rotate-release` writes) for the controller to publish to agents (admin).
func (c *Client) PushAnnouncement(ctx context.Context, signed []byte) (*KeyAnnouncement, error) {
	var out KeyAnnouncement
	if err := c.do(ctx, http.MethodPost, "/v1/keys/announcements", bytes.NewReader(signed), "application/octet-stream", &out); err != nil {
		return nil, err
	}
	return &out, nil
}
