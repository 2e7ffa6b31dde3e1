package update

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
)

// events collects what the updater reports.
type events struct {
	mu  sync.Mutex
	evs []*pb.Event
}

func (e *events) Event(_ context.Context, ev *pb.Event) {
	e.mu.Lock()
	e.evs = append(e.evs, ev)
	e.mu.Unlock()
}
func (e *events) StateChanged() {}

func (e *events) kinds() []pb.EventKind {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []pb.EventKind
	for _, ev := range e.evs {
		out = append(out, ev.GetKind())
	}
	return out
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestRecordCompatibility(t *testing.T) {
	dir := t.TempDir()
	rec := &Record{State: StateTrial, From: "1.0.0", To: "1.1.0", Exe: "/x/fleet-agent", DeadlineUnixMs: 42}
	if err := WriteRecord(dir, rec); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRecord(dir)
	if err != nil || got.State != StateTrial || got.To != "1.1.0" || got.Layout != recordLayout {
		t.Fatalf("read back %+v, %v", got, err)
	}
	cases := []struct {
		name, doc string
		ok        bool
	}{
		{"newer layout, compatible, unknown fields", `{"layout":7,"compat":1,"state":"healthy","from":"1.0.0","to":"1.1.0","exe":"/a","future":{"x":1}}`, true},
		{"newer layout, incompatible", `{"layout":7,"compat":2,"state":"healthy","to":"1.1.0","exe":"/a"}`, false},
		{"unknown state", `{"layout":1,"state":"dancing","to":"1.1.0","exe":"/a"}`, false},
		{"no target", `{"layout":1,"state":"trial","exe":"/a"}`, false},
		{"huge", `{"reason":"` + strings.Repeat("x", maxRecord) + `"}`, false},
	}
	for _, c := range cases {
		_, err := ParseRecord([]byte(c.doc))
		if (err == nil) != c.ok {
			t.Errorf("%s: err %v, want ok=%v", c.name, err, c.ok)
		}
	}
	if err := WriteRecord(dir, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadRecord(dir); got != nil || err != nil {
		t.Fatalf("after delete: %+v, %v", got, err)
	}
}

func FuzzParseRecord(f *testing.F) {
	f.Add([]byte(`{"layout":1,"compat":1,"state":"trial","from":"1.0.0","to":"1.1.0","exe":"/a","deadline_unix_ms":5}`))
	f.Add([]byte(`{"layout":2,"compat":1,"state":"restored","to":"1.1.0","exe":"/a","reason":"x","new":[1]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRecord(b)
		if err != nil {
			return
		}
		if !r.State.valid() || r.To == "" || r.Exe == "" || r.Compat > recordLayout {
			t.Fatalf("accepted a malformed record %+v", r)
		}
	})
}

// TestSwapAlwaysLeavesABinary walks the file operations of an update and
// its undoing, checking after each that NAME is a complete binary.
func TestSwapAlwaysLeavesABinary(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "fleet-agent")
	writeFile(t, exe, "old binary", 0o755)
	src := filepath.Join(dir, "release")
	writeFile(t, src, "new binary", 0o644)
	sum := sha256.Sum256([]byte("new binary"))

	if err := stage(exe, src, []byte("wrong checksum")); err == nil {
		t.Fatal("a release with the wrong checksum was staged")
	}
	if got := readFile(t, exe); got != "old binary" {
		t.Fatalf("NAME changed by a refused stage: %q", got)
	}
	steps := []struct {
		name string
		do   func() error
		want string
		old  bool
	}{
		{"stage", func() error { return stage(exe, src, sum[:]) }, "old binary", false},
		{"keep old", func() error { return keepOld(exe) }, "old binary", true},
		{"swap in", func() error { return swapIn(exe) }, "new binary", false},
		{"restore", func() error { return restoreOld(exe) }, "old binary", true},
		{"restore again", func() error { return restoreOld(exe) }, "old binary", true},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := readFile(t, exe); got != s.want {
			t.Fatalf("after %s NAME holds %q, want %q", s.name, got, s.want)
		}
		if old, err := isOld(exe); err != nil || old != s.old {
			t.Fatalf("after %s isOld = %v, %v; want %v", s.name, old, err, s.old)
		}
	}
	if fi, err := os.Stat(exe); err != nil || fi.Mode().Perm()&0o100 == 0 {
		t.Fatalf("NAME is not executable: %v %v", fi, err)
	}
	if got := readFile(t, OldPath(exe)); got != "old binary" {
		t.Fatalf("NAME.old holds %q", got)
	}
}

func signedDoc(t *testing.T, m release.Manifest) ([]byte, *trust.KeySet) {
	t.Helper()
	pub, priv, _ := trust.GenerateKey()
	d, err := release.Sign(priv, m)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := d.Encode()
	return raw, trust.NewKeySet(pub)
}

func newTestUpdater(t *testing.T, o Options) (*Updater, *events) {
	t.Helper()
	ev := &events{}
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	if o.Exe == "" {
		o.Exe = filepath.Join(t.TempDir(), "fleet-agent")
		writeFile(t, o.Exe, "running binary", 0o755)
	}
	if o.Version == "" {
		o.Version = "1.0.0"
	}
	if o.Controller == "" {
		o.Controller = "http://127.0.0.1:9"
	}
	o.Reporter = ev
	if o.Desired == nil {
		o.Desired = func() (*pb.AgentRelease, uint64) { return nil, 0 }
	}
	u, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return u, ev
}

func TestCheckRefusesBeforeAnythingIsReplaced(t *testing.T) {
	sum := sha256.Sum256([]byte("x"))
	good := release.Manifest{Version: "1.1.0", OS: runtime.GOOS, Arch: runtime.GOARCH, SHA256: hex.EncodeToString(sum[:]), Size: 1}
	raw, keys := signedDoc(t, good)
	otherRaw, _ := signedDoc(t, good) // signed by a key the agent does not trust
	wrongArch := good
	wrongArch.Arch = "mips64"
	archRaw, archKeys := signedDoc(t, wrongArch)

	cases := []struct {
		name string
		keys *trust.KeySet
		doc  []byte
		want string
	}{
		{"good", keys, raw, ""},
		{"untrusted key", keys, otherRaw, "unknown key"},
		{"wrong version", keys, raw, "desired state names 1.2.0"},
		{"wrong platform", archKeys, archRaw, "built for " + runtime.GOOS + "/mips64"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			u, _ := newTestUpdater(t, Options{Release: c.keys})
			want := "1.1.0"
			if c.name == "wrong version" {
				want = "1.2.0"
			}
			_, err := u.check(c.doc, want)
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var p permanent
			if err == nil || !strings.Contains(err.Error(), c.want) || !errors.As(err, &p) {
				t.Fatalf("err %v; want a permanent refusal naming %q", err, c.want)
			}
		})
	}
}

func TestVersionFloor(t *testing.T) {
	cases := []struct {
		name             string
		want             string
		rollback, signed bool
		floor            string
		refused          bool
	}{
		{"older than installed", "0.9.0", false, true, "", true},
		{"older, unsigned rollback order", "0.9.0", true, false, "", true},
		{"older, signed rollback order", "0.9.0", true, true, "", false},
		{"below the stored floor", "1.1.0", false, true, "1.2.0", true},
		{"newer", "1.1.0", false, true, "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			if c.floor != "" {
				if err := writeFloor(dir, c.floor); err != nil {
					t.Fatal(err)
				}
			}
			u, ev := newTestUpdater(t, Options{DataDir: dir, SignedRollbacks: c.signed})
			exe := readFile(t, u.o.Exe)
			err := u.install(t.Context(), &pb.AgentRelease{Version: c.want, Url: "/v1/artifacts/agent-releases/" + c.want, Rollback: c.rollback}, 3)
			var p permanent
			refused := err != nil && errors.As(err, &p) && strings.Contains(err.Error(), "version floor")
			if refused != c.refused {
				t.Fatalf("err %v; want refused=%v", err, c.refused)
			}
			if !c.refused && (err == nil || errors.As(err, &p)) {
				// Allowed: it went on to the download, which fails (no
				// controller), and is retried.
				t.Fatalf("err %v; want a retryable download error", err)
			}
			if got := readFile(t, u.o.Exe); got != exe {
				t.Fatal("the binary was replaced")
			}
			if c.refused && len(ev.kinds()) != 0 {
				t.Fatalf("refused before any download, yet reported %v", ev.kinds())
			}
		})
	}
}

// TestSettleAfterRestore: the previous binary, restored by the watchdog,
// reports the new version ROLLED_BACK with the reason, and does not try
// that release again in the same generation.
func TestSettleAfterRestore(t *testing.T) {
	dir := t.TempDir()
	rec := &Record{State: StateRestored, From: "1.0.0", To: "1.1.0", Exe: "/x", RolloutID: "r1", Generation: 4, Reason: "agent 1.1.0: it exited (exit status 3)"}
	if err := WriteRecord(dir, rec); err != nil {
		t.Fatal(err)
	}
	u, ev := newTestUpdater(t, Options{DataDir: dir, Desired: func() (*pb.AgentRelease, uint64) {
		return &pb.AgentRelease{Version: "1.1.0", RolloutId: "r1"}, 4
	}})
	u.Poke()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- u.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for len(ev.kinds()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if k := ev.kinds(); len(k) != 1 || k[0] != pb.EventKind_EVENT_KIND_ROLLED_BACK {
		t.Fatalf("events %v; want one ROLLED_BACK and no new attempt", k)
	}
	ev.mu.Lock()
	e := ev.evs[0]
	ev.mu.Unlock()
	if e.GetRolloutId() != "r1" || e.GetModel().GetVersion() != "1.1.0" || !strings.Contains(e.GetDetail(), "exit status 3") {
		t.Fatalf("event %v", e)
	}
	got, err := ReadRecord(dir)
	if err != nil || got.State != StateFailed {
		t.Fatalf("record %+v, %v; want failed", got, err)
	}
	if st := u.State(); !strings.Contains(st.GetLastError(), "exit status 3") {
		t.Fatalf("state %v", st)
	}
}

// script writes an executable shell script standing in for an agent
// binary in the supervisor tests.
func script(t *testing.T, path, body string) {
	t.Helper()
	writeFile(t, path, "#!/bin/sh\n"+body+"\n", 0o755)
}

func TestSuperviseRestores(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("needs /bin/sh")
	}
	cases := []struct {
		name, newBody string
		deadline      time.Duration
		reason        string
	}{
		{"exits", "exit 3", time.Minute, "exit status 3"},
		{"misses its deadline", "exec sleep 60", 300 * time.Millisecond, "deadline"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			exe := filepath.Join(dir, "fleet-agent")
			marker := filepath.Join(dir, "old-ran")
			script(t, exe, "touch "+marker+"; exec sleep 60") // the previous version
			if err := keepOld(exe); err != nil {
				t.Fatal(err)
			}
			script(t, exe+".next", c.newBody)
			if err := os.Rename(exe+".next", exe); err != nil {
				t.Fatal(err)
			}
			now := time.Now()
			rec := &Record{State: StateTrial, From: "1.0.0", To: "1.1.0", Exe: exe, SwappedUnixMs: now.UnixMilli(), DeadlineUnixMs: now.Add(c.deadline).UnixMilli()}
			if err := WriteRecord(dir, rec); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error, 1)
			go func() {
				done <- Supervise(ctx, SuperviseOptions{Exe: exe, DataDir: dir, Poll: 20 * time.Millisecond, StopTimeout: 5 * time.Second})
			}()
			deadline := time.Now().Add(20 * time.Second)
			for {
				if _, err := os.Stat(marker); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the previous binary was not restored and started")
				}
				time.Sleep(10 * time.Millisecond)
			}
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if old, err := isOld(exe); err != nil || !old {
				t.Fatalf("NAME is not the previous binary: %v %v", old, err)
			}
			got, err := ReadRecord(dir)
			if err != nil || got.State != StateRestored || !strings.Contains(got.Reason, c.reason) {
				t.Fatalf("record %+v, %v; want restored because of %q", got, err, c.reason)
			}
		})
	}
}
