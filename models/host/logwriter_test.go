package host

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestLogWriterRateLimits(t *testing.T) {
	var out bytes.Buffer
	clock := time.Unix(1000, 0)
	w := newLogWriter(slog.New(slog.NewTextHandler(&out, nil)), slog.LevelWarn, "stderr")
	w.now = func() time.Time { return clock }

	// Lines may arrive split across writes.
	w.Write([]byte("hel"))
	w.Write([]byte("lo 0\nhello 1\n"))
	for i := 2; i < 30; i++ {
		w.Write([]byte("hello\n"))
	}
	if n := strings.Count(out.String(), "guest: hello"); n != logBurst {
		t.Fatalf("%d lines logged in a burst of 30, want %d:\n%s", n, logBurst, out.String())
	}
	if !strings.Contains(out.String(), `"guest: hello 0"`) || !strings.Contains(out.String(), "stream=stderr") {
		t.Fatalf("first line lost or unlabelled:\n%s", out.String())
	}
	out.Reset()
	clock = clock.Add(time.Second) // 5 tokens back
	for i := 0; i < 10; i++ {
		w.Write([]byte("again\n"))
	}
	if n := strings.Count(out.String(), "guest: again"); n != logPerSec {
		t.Fatalf("%d lines after a second, want %d", n, logPerSec)
	}
	if !strings.Contains(out.String(), "dropped_lines=10") {
		t.Fatalf("the first line after drops must count them:\n%s", out.String())
	}
	// A line without a newline is cut at maxLogLine.
	out.Reset()
	clock = clock.Add(time.Minute)
	w.Write(bytes.Repeat([]byte("x"), 3*maxLogLine))
	if n := strings.Count(out.String(), "guest: x"); n != 1 {
		t.Fatalf("an endless line logged %d times", n)
	}
	// Below the logger's level nothing is kept.
	quiet := newLogWriter(slog.New(slog.NewTextHandler(&out, nil)), slog.LevelDebug, "stdout")
	out.Reset()
	quiet.Write([]byte("debug line\n"))
	if out.Len() != 0 || len(quiet.buf) != 0 {
		t.Fatal("a line below the log level was logged or buffered")
	}
}
