package host

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"time"
)

// logWriter turns a guest's stdout or stderr into log lines. A guest
// printing in a tight loop must not flood the device's log, so lines pass
// through a token bucket (burst 20, then 5 per second); what is dropped is
// counted and reported with the next line that passes.
type logWriter struct {
	log    *slog.Logger
	level  slog.Level
	stream string

	now func() time.Time // injected by tests

	mu      sync.Mutex
	buf     []byte
	tokens  float64
	last    time.Time
	dropped int
}

const (
	logBurst   = 20
	logPerSec  = 5
	maxLogLine = 1 << 10
)

func newLogWriter(log *slog.Logger, level slog.Level, stream string) *logWriter {
	return &logWriter{log: log, level: level, stream: stream, tokens: logBurst, now: time.Now}
}

func (w *logWriter) Write(p []byte) (int, error) {
	if !w.log.Enabled(context.Background(), w.level) {
		return len(p), nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			if len(w.buf) > maxLogLine {
				w.emit(w.buf[:maxLogLine])
				w.buf = w.buf[:0]
			}
			return len(p), nil
		}
		w.emit(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
}

func (w *logWriter) emit(line []byte) {
	now := w.now()
	if !w.last.IsZero() {
		w.tokens = min(logBurst, w.tokens+now.Sub(w.last).Seconds()*logPerSec)
	}
	w.last = now
	if w.tokens < 1 {
		w.dropped++
		return
	}
	w.tokens--
	if len(line) > maxLogLine {
		line = line[:maxLogLine]
	}
	attrs := []any{"stream", w.stream}
	if w.dropped > 0 {
		attrs = append(attrs, "dropped_lines", w.dropped)
		w.dropped = 0
	}
	w.log.Log(context.Background(), w.level, "guest: "+string(line), attrs...)
}
