package client

import (
	"context"
	"io"
	"mime/multipart"
	"net/http"
	"time"
)

// AgentRelease is one stored agent release for one platform.
type AgentRelease struct {
	Version   string    `json:"version"`
	OS        string    `json:"os"`
	Arch      string    `json:"arch"`
	SHA256    string    `json:"sha256"`
	Size      int64     `json:"size"`
	CreatedAt time.Time `json:"createdAt"`
}

// PushAgentRelease uploads a signed release document (release.Document's
// JSON) and the binary it pins, streaming the binary.
func (c *Client) PushAgentRelease(ctx context.Context, doc []byte, binary io.Reader) (*AgentRelease, error) {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := func() error {
			w, err := mw.CreateFormField("release")
			if err != nil {
				return err
			}
			if _, err := w.Write(doc); err != nil {
				return err
			}
			w, err = mw.CreateFormFile("binary", "edgefleet-agent")
			if err != nil {
				return err
			}
			if _, err := io.Copy(w, binary); err != nil {
				return err
			}
			return mw.Close()
		}()
		pw.CloseWithError(err)
	}()
	var out AgentRelease
	if err := c.do(ctx, http.MethodPost, "/v1/agent/releases", pr, mw.FormDataContentType(), &out); err != nil {
		pr.CloseWithError(err)
		return nil, err
	}
	return &out, nil
}

// AgentReleases lists the stored agent releases.
func (c *Client) AgentReleases(ctx context.Context) ([]AgentRelease, error) {
	var out struct {
		Releases []AgentRelease `json:"releases"`
	}
	err := c.getJSON(ctx, "/v1/agent/releases", &out)
	return out.Releases, err
}
