// Package client is a Go client of the controller's HTTP API. The fleet CLI,
// the demo and the end-to-end tests use it; like any other client it knows
// only the API, never the controller's code.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// DefaultURL is where a controller started with no flags listens.
const DefaultURL = "http://127.0.0.1:8080"

// maxResponse caps how much of a response body the client reads.
const maxResponse = 32 << 20

// Client calls one controller.
type Client struct {
	base  string
	token string
	http  *http.Client
	// stream has no overall timeout, for event streams.
	stream *http.Client
}

// New returns a client for the controller at baseURL. token, when set, is
// sent as a bearer token.
func New(baseURL, token string) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("controller URL %q: want http://host:port or https://host:port", baseURL)
	}
	return &Client{base: strings.TrimRight(baseURL, "/"), token: token, http: &http.Client{Timeout: 60 * time.Second}, stream: &http.Client{}}, nil
}

// APIError is an error answer of the controller.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("controller answered %d: %s", e.Status, e.Message)
}

// ErrNotFound is wrapped by errors for a 404 answer.
var ErrNotFound = errors.New("not found")

func (e *APIError) Unwrap() error {
	if e.Status == http.StatusNotFound {
		return ErrNotFound
	}
	return nil
}

func (c *Client) do(ctx context.Context, method, path string, body io.Reader, contentType string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the controller at %s (is fleet-controller running? set --controller or EDGEFLEET_CONTROLLER): %w", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return fmt.Errorf("%s %s: reading answer: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		msg := strings.TrimSpace(string(data))
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		return &APIError{Status: resp.StatusCode, Message: msg}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: answer is not the JSON expected: %w", method, path, err)
	}
	return nil
}

func (c *Client) getJSON(ctx context.Context, path string, out any) error {
	return c.do(ctx, http.MethodGet, path, nil, "", out)
}

func (c *Client) postJSON(ctx context.Context, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return c.do(ctx, http.MethodPost, path, bytes.NewReader(b), "application/json", out)
}

// Healthz returns nil when the controller answers its health check.
func (c *Client) Healthz(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/healthz", nil, "", nil)
}

// Devices lists the devices matching a label selector ("" = all).
func (c *Client) Devices(ctx context.Context, selector string) ([]Device, error) {
	var out struct {
		Devices []Device `json:"devices"`
	}
	path := "/v1/devices"
	if selector != "" {
		path += "?selector=" + url.QueryEscape(selector)
	}
	err := c.getJSON(ctx, path, &out)
	return out.Devices, err
}

// Device returns one device.
func (c *Client) Device(ctx context.Context, id string) (*Device, error) {
	var d Device
	if err := c.getJSON(ctx, "/v1/devices/"+url.PathEscape(id), &d); err != nil {
		return nil, err
	}
	return &d, nil
}

// PushModel uploads a bundle file's bytes.
func (c *Client) PushModel(ctx context.Context, bundle []byte) (*Model, error) {
	var m Model
	if err := c.do(ctx, http.MethodPost, "/v1/models", bytes.NewReader(bundle), "application/octet-stream", &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// Models lists the uploaded models.
func (c *Client) Models(ctx context.Context) ([]Model, error) {
	var out struct {
		Models []Model `json:"models"`
	}
	err := c.getJSON(ctx, "/v1/models", &out)
	return out.Models, err
}

// Assign sets model@version into a slot of every device matching selector
// and returns the ids of the devices it was assigned to.
func (c *Client) Assign(ctx context.Context, a Assignment) ([]string, error) {
	var out struct {
		Devices []string `json:"devices"`
	}
	err := c.postJSON(ctx, "/v1/assignments", a, &out)
	return out.Devices, err
}
