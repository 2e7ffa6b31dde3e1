package client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestReadEvents(t *testing.T) {
	stream := ": ping\n\nevent: rollout\nid: 3\ndata: {\"a\":\ndata: 1}\n\n" +
		"data: plain\r\n\r\n" + // CRLF lines, default type
		"event: other\nid: 4\n\n" + // no data
		"event: rollout\ndata: tail" // unterminated: dropped at EOF
	var got []StreamEvent
	err := ReadEvents(strings.NewReader(stream), func(ev StreamEvent) error {
		ev.Data = append([]byte(nil), ev.Data...)
		got = append(got, ev)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []StreamEvent{
		{Type: "rollout", ID: "3", Data: []byte("{\"a\":\n1}")},
		{Type: "message", Data: []byte("plain")},
		{Type: "other", ID: "4"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("events = %q\nwant %q", got, want)
	}
	// A line over the cap is refused, not buffered.
	huge := "data: " + strings.Repeat("x", MaxEvent+10) + "\n\n"
	if err := ReadEvents(strings.NewReader(huge), func(StreamEvent) error { return nil }); err == nil || !strings.Contains(err.Error(), "over") {
		t.Fatalf("huge line: %v", err)
	}
	stop := errors.New("stop")
	if err := ReadEvents(strings.NewReader("data: x\n\ndata: y\n\n"), func(StreamEvent) error { return stop }); !errors.Is(err, stop) {
		t.Fatalf("callback error = %v", err)
	}
}

func FuzzReadEvents(f *testing.F) {
	f.Add([]byte("event: rollout\nid: 1\ndata: {}\n\n: ping\n\n"))
	f.Add([]byte("data: a\r\ndata: b\r\n\r\n"))
	f.Add([]byte("\n\n\n:\nevent\nid\ndata\n\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		total := 0
		err := ReadEvents(strings.NewReader(string(data)), func(ev StreamEvent) error {
			total += len(ev.Data)
			if ev.Type == "" {
				t.Fatal("event without a type")
			}
			return nil
		})
		if err != nil && !strings.Contains(err.Error(), "over") {
			t.Fatalf("unexpected error %v", err)
		}
		if total > len(data) {
			t.Fatalf("more data out (%d) than in (%d)", total, len(data))
		}
	})
}

// TestWatchRolloutReconnects serves a stream that breaks after one event;
// the watch reconnects and ends when the rollout finishes.
func TestWatchRolloutReconnects(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/rollouts/nobody/events" {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"error":"rollout \"nobody\": not found"}`)
			return
		}
		if r.URL.Path != "/v1/rollouts/r1/events" || r.Header.Get("Authorization") != "Bearer tok" {
			t.Errorf("request %s %v", r.URL.Path, r.Header)
		}
		n := conns.Add(1)
		w.Header().Set("Content-Type", "text/event-stream")
		if n == 2 && r.Header.Get("Last-Event-ID") != "1" {
			t.Errorf("reconnect without Last-Event-ID: %v", r.Header)
		}
		phase := []string{"", "running", "succeeded"}[min(n, 2)]
		fmt.Fprintf(w, "event: rollout\nid: %d\ndata: {\"id\":\"r1\",\"phase\":%q,\"revision\":%d}\n\n", n, phase, n)
		w.(http.Flusher).Flush()
		// The first connection breaks; a later one would stay open.
		if n > 1 {
			<-r.Context().Done()
		}
	}))
	defer srv.Close()
	c, err := New(srv.URL, "tok")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var phases []string
	err = c.WatchRollout(ctx, "r1", func(r *Rollout) error {
		phases = append(phases, r.Phase)
		if r.Finished() {
			return ErrStopWatching
		}
		return nil
	})
	if err != nil || !reflect.DeepEqual(phases, []string{"running", "succeeded"}) {
		t.Fatalf("watch = %v, phases %v", err, phases)
	}
	// An error answer ends the watch with that error.
	err = c.WatchRollout(ctx, "nobody", func(*Rollout) error { return nil })
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusNotFound || !errors.Is(err, ErrNotFound) {
		t.Fatalf("watch of an unknown rollout = %v", err)
	}
	// A callback error ends it too.
	boom := errors.New("boom")
	if err := c.WatchRollout(ctx, "r1", func(*Rollout) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("callback error = %v", err)
	}
}
