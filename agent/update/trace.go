package update

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// TraceEnv names the environment variable through which a self-update's
// restart trace crosses the exec: the old process's marks, which the new
// process continues and logs once it answers again.
const TraceEnv = "EDGEFLEET_RESTART_TRACE"

// maxTraceEnv caps the variable: a few dozen marks of a few dozen bytes.
const maxTraceEnv = 4 << 10

// maxMarks caps the marks a trace keeps (a restart has about a dozen).
const maxMarks = 32

// The steps of a restart the agent marks, in the order they happen.
// Between StepStopServing and StepFirstAnswer the local endpoint answers
// nothing: calls wait in the handed-over socket's backlog.
const (
	StepRestartOrdered = "restart-ordered" // the new binary is in place
	StepStopServing    = "stop-serving"    // the local endpoint stops accepting
	StepServingStopped = "serving-stopped" // in-flight calls answered
	StepStopped        = "stopped"         // every goroutine of the agent ended
	StepClosed         = "closed"          // models, host and spool closed
	StepExec           = "exec"            // execve of the new binary
	StepStarted        = "started"         // main of the new binary runs
	StepConfigured     = "configured"      // configuration read, agent made
	StepSpoolOpened    = "spool-opened"
	StepHostReady      = "host-ready" // wazero runtime and compilation cache
	StepRestored       = "restored"   // models loaded from disk
	StepServing        = "serving"    // the local endpoint accepts again
	StepFirstAnswer    = "first-answer"
)

// Mark is one step of a trace and when it happened (wall clock: the
// monotonic clock does not survive an exec's new runtime).
type Mark struct {
	Step string
	At   time.Time
}

// Trace times a self-update's restart across the exec, so where the
// local endpoint's downtime goes is visible in every update's log (see
// BENCHMARKS.md, issue 8). A nil *Trace is valid and records nothing, so
// callers mark steps without checking whether a restart is being traced.
type Trace struct {
	mu    sync.Mutex
	marks []Mark
}

// NewTrace starts an empty trace.
func NewTrace() *Trace { return &Trace{} }

// Mark records that step happened now.
func (t *Trace) Mark(step string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	if len(t.marks) < maxMarks {
		t.marks = append(t.marks, Mark{Step: step, At: time.Now()})
	}
	t.mu.Unlock()
}

// Has reports whether step was marked.
func (t *Trace) Has(step string) bool {
	if t == nil {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, m := range t.marks {
		if m.Step == step {
			return true
		}
	}
	return false
}

// Marks returns a copy of the marks in the order they were made.
func (t *Trace) Marks() []Mark {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]Mark(nil), t.marks...)
}

// Pass puts the trace in the environment the exec'd binary inherits.
func (t *Trace) Pass() error {
	if t == nil {
		return nil
	}
	return os.Setenv(TraceEnv, t.encode())
}

func (t *Trace) encode() string {
	var b strings.Builder
	for i, m := range t.Marks() {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%d", m.Step, m.At.UnixNano())
	}
	return b.String()
}

// InheritTrace returns the trace the process this one replaced passed
// (TraceEnv), with StepStarted marked, and removes it from the
// environment so the agent's own children do not inherit it. It returns
// nil when the process was not started by a self-update, or the variable
// is malformed (a trace is diagnostics: never a reason not to start).
func InheritTrace() *Trace {
	v, ok := os.LookupEnv(TraceEnv)
	if !ok {
		return nil
	}
	os.Unsetenv(TraceEnv)
	t, err := ParseTrace(v)
	if err != nil {
		return nil
	}
	t.Mark(StepStarted)
	return t
}

// ParseTrace decodes a trace as Pass encodes it: comma-separated
// step=unix-nanoseconds pairs.
func ParseTrace(s string) (*Trace, error) {
	if len(s) > maxTraceEnv {
		return nil, fmt.Errorf("restart trace of %d bytes, over the %d byte cap", len(s), maxTraceEnv)
	}
	t := &Trace{}
	if s == "" {
		return t, nil
	}
	for p := range strings.SplitSeq(s, ",") {
		step, ns, ok := strings.Cut(p, "=")
		if !ok || step == "" || len(step) > 64 {
			return nil, fmt.Errorf("restart trace entry %q: want step=unix-nanoseconds", p)
		}
		n, err := strconv.ParseInt(ns, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("restart trace entry %q: want step=unix-nanoseconds", p)
		}
		if len(t.marks) == maxMarks {
			return nil, fmt.Errorf("restart trace has over %d entries", maxMarks)
		}
		t.marks = append(t.marks, Mark{Step: step, At: time.Unix(0, n)})
	}
	return t, nil
}

// Reset drops every mark: the trace starts over for the next restart.
func (t *Trace) Reset() {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.marks = nil
	t.mu.Unlock()
}

// Report logs the marks under msg as the time each step took since the
// one before it, and the whole gap from StepStopServing to the last mark,
// then drops them (Reset). The agent calls it at its first answer after a
// restart.
func (t *Trace) Report(log *slog.Logger, msg string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	marks := t.marks
	t.marks = nil
	t.mu.Unlock()
	if len(marks) == 0 {
		return
	}
	attrs := []any{}
	var stop time.Time
	for i, m := range marks {
		if m.Step == StepStopServing && stop.IsZero() {
			stop = m.At
		}
		if i > 0 {
			attrs = append(attrs, m.Step, m.At.Sub(marks[i-1].At).Round(10*time.Microsecond).String())
		}
	}
	if !stop.IsZero() {
		attrs = append(attrs, "gap", marks[len(marks)-1].At.Sub(stop).Round(10*time.Microsecond).String())
	}
	log.Info(msg+" (each step: time since the previous one)", attrs...)
}
