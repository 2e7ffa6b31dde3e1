package update

import (
	"bytes"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"
)

// TestTraceCrossesExec: the marks an old process passes in the
// environment come back, in order and to the nanosecond, in the process
// that inherits them, which adds StepStarted and logs every step and the
// gap from StepStopServing.
func TestTraceCrossesExec(t *testing.T) {
	t.Setenv(TraceEnv, "")
	os.Unsetenv(TraceEnv)
	if InheritTrace() != nil {
		t.Fatal("a trace without the variable")
	}
	old := NewTrace()
	for _, s := range []string{StepRestartOrdered, StepStopServing, StepStopped, StepExec} {
		old.Mark(s)
		time.Sleep(time.Millisecond) // distinct, ordered wall-clock stamps
	}
	if err := old.Pass(); err != nil {
		t.Fatal(err)
	}
	got := InheritTrace()
	if _, ok := os.LookupEnv(TraceEnv); ok {
		t.Fatal("InheritTrace left the variable for the agent's children")
	}
	want := old.Marks()
	marks := got.Marks()
	if len(marks) != len(want)+1 || marks[len(marks)-1].Step != StepStarted {
		t.Fatalf("inherited %v, want %v then %s", marks, want, StepStarted)
	}
	for i, m := range want {
		if marks[i].Step != m.Step || !marks[i].At.Equal(m.At) {
			t.Fatalf("mark %d: %v, want %v", i, marks[i], m)
		}
	}
	got.Mark(StepFirstAnswer)
	var buf bytes.Buffer
	got.Report(slog.New(slog.NewTextHandler(&buf, nil)), "restart timing")
	line := buf.String()
	for _, s := range []string{StepStopServing + "=", StepExec + "=", StepStarted + "=", StepFirstAnswer + "=", "gap="} {
		if !strings.Contains(line, s) {
			t.Fatalf("report %q lacks %s", line, s)
		}
	}
	if strings.Contains(line, StepRestartOrdered+"=") {
		t.Fatalf("report %q times the first mark, which has nothing before it", line)
	}
	if got.Marks() != nil {
		t.Fatal("Report kept the marks; the next restart would inherit them")
	}
}

// TestTraceNilAndCaps: a nil trace records nothing and never panics;
// malformed or oversized variables are refused, and a trace stops
// growing at its cap.
func TestTraceNilAndCaps(t *testing.T) {
	var nt *Trace
	nt.Mark(StepExec)
	nt.Reset()
	nt.Report(slog.New(slog.DiscardHandler), "x")
	if nt.Has(StepExec) || nt.Marks() != nil || nt.Pass() != nil {
		t.Fatal("a nil trace recorded something")
	}
	tr := NewTrace()
	for range maxMarks + 5 {
		tr.Mark("step")
	}
	if n := len(tr.Marks()); n != maxMarks {
		t.Fatalf("%d marks kept, want the cap %d", n, maxMarks)
	}
	if _, err := ParseTrace(tr.encode() + ",extra=1"); err == nil {
		t.Fatal("a trace over the mark cap parsed")
	}
	for _, bad := range []string{"x", "=1", "a=", "a=-1", "a=1,,b=2", "a=zz", strings.Repeat("a", maxTraceEnv+1)} {
		if _, err := ParseTrace(bad); err == nil {
			t.Fatalf("ParseTrace(%.40q) accepted it", bad)
		}
	}
	t.Setenv(TraceEnv, "garbage")
	if InheritTrace() != nil {
		t.Fatal("a malformed variable gave a trace")
	}
}

func FuzzParseTrace(f *testing.F) {
	f.Add("")
	f.Add("exec=1700000000000000000,started=1700000000050000000")
	f.Add("a=1,b")
	f.Add(strings.Repeat("s=1,", 40))
	f.Fuzz(func(t *testing.T, s string) {
		tr, err := ParseTrace(s)
		if err != nil {
			return
		}
		if len(tr.Marks()) > maxMarks {
			t.Fatalf("%d marks, over the cap", len(tr.Marks()))
		}
		again, err := ParseTrace(tr.encode())
		if err != nil || len(again.Marks()) != len(tr.Marks()) {
			t.Fatalf("re-encoded trace %q does not parse back: %v", tr.encode(), err)
		}
	})
}
