package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/update"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/scripts/internal/agentbuild"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// The acceptance tests of agent self-update (issue 8): real fleet-agent
// binaries built at different versions with -ldflags -X, each agent
// running from its own copy of the binary under its watchdog
// (`fleet-agent supervise`), signed releases pushed with `fleet agent
// release push` and rolled out with the rollout engine.
//
// Broken releases are the same agent built with the TEST-ONLY switch
// main.testBehavior: "exit" exits with status 3 at start, "noconnect"
// never reaches the broker.

// Versions of the agent the tests build.
const (
	suBase      = "1.0.0"
	suGood      = "1.1.0"
	suExit      = "1.2.0" // testBehavior=exit
	suNoConnect = "1.3.0" // testBehavior=noconnect
)

// suDeadline is the watchdog's deadline the tests configure (default 60s).
const suDeadline = 8 * time.Second

var (
	suBuildOnce sync.Once
	suBuildErr  error
)

// agentBin is the path of the agent built at version (with behavior).
func agentBin(version, behavior string) string {
	name := "fleet-agent-" + version
	if behavior != "" {
		name += "-" + behavior
	}
	return filepath.Join(binDir, name)
}

// buildAgentVersions builds every agent variant the tests use, once.
func buildAgentVersions(t *testing.T) {
	t.Helper()
	buildBinaries(t)
	suBuildOnce.Do(func() {
		for _, b := range []struct{ version, behavior string }{{suBase, ""}, {suGood, ""}, {suExit, "exit"}, {suNoConnect, "noconnect"}} {
			xs := []string{"github.com/edgefleet/edgefleet/agent.Version=" + b.version}
			if b.behavior != "" {
				xs = append(xs, "main.testBehavior="+b.behavior)
			}
			// Built as releases are (scripts/internal/agentbuild).
			cmd := agentbuild.Command(context.Background(), "", agentBin(b.version, b.behavior), agentbuild.Options{X: xs})
			if out, err := cmd.CombinedOutput(); err != nil {
				suBuildErr = fmt.Errorf("go build agent %s %s: %v\n%s", b.version, b.behavior, err, out)
				return
			}
		}
	})
	if suBuildErr != nil {
		t.Fatal(suBuildErr)
	}
}

// suFleet is a controller with agents under their watchdogs, all trusting
// the release key made with `fleet keys init` and the director key.
type suFleet struct {
	*fleet
	keys        string
	directorPub string
	exes        map[string]string
}

func startSelfUpdateFleet(t *testing.T) *suFleet {
	t.Helper()
	buildAgentVersions(t)
	f := &suFleet{fleet: startController(t, ""), exes: map[string]string{}}
	f.keys = filepath.Join(f.dir, "keys")
	f.fleetCLI("keys", "init", "--dir", f.keys)
	f.directorPub = filepath.Join(f.dir, "controller", "keys", "director.pub")
	return f
}

// startSupervised starts agent id from its own copy of the base binary
// (made on first start) under `fleet-agent supervise`, and waits for its
// local endpoint.
func (f *suFleet) startSupervised(id string, labels ...string) {
	f.t.Helper()
	exe := filepath.Join(f.dir, id, "bin", "fleet-agent")
	if _, err := os.Stat(exe); err != nil {
		copyExe(f.t, agentBin(suBase, ""), exe)
	}
	f.exes[id] = exe
	listen := f.listens[id]
	if listen == "" {
		listen = fmt.Sprintf("127.0.0.1:%d", port(f.t))
	}
	args := []string{"supervise", "--", "--id", id, "--data", filepath.Join(f.dir, id, "data"), "--listen", listen,
		"--broker", f.broker, "--controller", f.api, "--update-deadline", suDeadline.String(),
		"--release-key", filepath.Join(f.keys, "release.pub"), "--director-key", f.directorPub}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	p, err := proc.StartTied(id, filepath.Join(f.dir, id+".log"), exe, args...)
	if err != nil {
		f.t.Fatal(err)
	}
	f.agents[id], f.listens[id] = p, listen
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.WaitHTTP(ctx, "http://"+listen+"/v2/health/live"); err != nil {
		f.t.Fatal(err, "\n", f.logTail(id+".log"))
	}
}

// copyExe gives an agent its own binary path. A hard link, not a copy: a
// file just written may still be open for writing in a child another test
// is forking at that moment, and exec would fail with "text file busy".
// Sharing the inode is safe, since a self-update never writes into the
// binary: it renames new files over the path.
func copyExe(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(src, dst); err != nil {
		t.Fatalf("link the agent binary: %v", err)
	}
}

// push signs bin as agent release version with the fleet's release key
// and uploads it, through the fleet CLI.
func (f *suFleet) push(bin, version string) {
	f.t.Helper()
	out := f.fleetCLI("agent", "release", "push", bin, "--version", version, "--key", filepath.Join(f.keys, "release.key"))
	if !strings.Contains(out, "agent release "+version) {
		f.t.Fatalf("fleet agent release push printed %q", out)
	}
}

// rollout starts an agent release rollout and returns its id.
func (f *suFleet) rollout(name, version, sel, onFailure string, waves ...string) string {
	f.t.Helper()
	spec := client.RolloutSpec{Name: name, Selector: sel, Agent: version,
		Strategy: client.RolloutStrategy{Soak: "1s", Deadline: "90s", OnFailure: onFailure}}
	for _, w := range waves {
		spec.Strategy.Waves = append(spec.Strategy.Waves, client.WaveSpec{Size: w})
	}
	r, err := f.client.CreateRollout(context.Background(), spec)
	if err != nil {
		f.t.Fatalf("create rollout %s: %v", name, err)
	}
	return r.ID
}

func (f *suFleet) waitPhase(id string, timeout time.Duration, phases ...string) *client.Rollout {
	f.t.Helper()
	var got *client.Rollout
	f.eventually("rollout "+id+" "+strings.Join(phases, " or "), timeout, func() (bool, string) {
		r, err := f.client.Rollout(context.Background(), id)
		if err != nil {
			return false, err.Error()
		}
		got = r
		return slices.Contains(phases, r.Phase), r.Phase + " " + r.Reason
	})
	return got
}

// onVersion waits until every device reports agent version, healthy.
func (f *suFleet) onVersion(version string, timeout time.Duration, ids ...string) {
	f.t.Helper()
	f.eventually("agent "+version+" healthy on "+strings.Join(ids, ","), timeout, func() (bool, string) {
		for _, id := range ids {
			d, err := f.client.Device(context.Background(), id)
			if err != nil {
				return false, err.Error()
			}
			if d.AgentVersion != version || d.AgentUpdate == nil || !d.AgentUpdate.Healthy || !d.Online {
				return false, fmt.Sprintf("%s: version %s, online %v, update %+v", id, d.AgentVersion, d.Online, d.AgentUpdate)
			}
		}
		return true, ""
	})
}

// binaryVersion runs the agent binary of id (or its .old) with --version.
func (f *suFleet) binaryVersion(path string) string {
	f.t.Helper()
	v, err := update.BinaryVersion(context.Background(), path)
	if err != nil {
		f.t.Fatalf("the agent binary on disk does not run: %v", err)
	}
	return v
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestAgentSelfUpdateGoodRelease: a good release rolls out in two waves to
// three agents; every one reports the new version, runs it from disk with
// the previous binary beside it, and its model keeps answering but for the
// restart, whose longest gap between answers is logged beside a plain
// stop-and-start restart's.
func TestAgentSelfUpdateGoodRelease(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startSelfUpdateFleet(t)
	ids := []string{"su-good-1", "su-good-2", "su-good-3"}
	for _, id := range ids {
		f.startSupervised(id, "su=good")
	}
	// A signed model, so the downtime measured is the model's.
	bundle := filepath.Join(f.dir, "grid-anomaly-1.0.0.bundle")
	if err := os.WriteFile(bundle, modeltest.BuildExample(t, "grid-anomaly", "1.0.0"), 0o644); err != nil {
		t.Fatal(err)
	}
	f.fleetCLI("model", "sign", "--key", filepath.Join(f.keys, "release.key"), bundle)
	f.fleetCLI("model", "push", bundle)
	if _, err := f.client.Assign(context.Background(), client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "su=good"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", ids...)
	f.onVersion(suBase, 30*time.Second, ids...)

	f.push(agentBin(suGood, ""), suGood)
	if out := f.fleetCLI("agent", "release", "list"); !strings.Contains(out, suGood) {
		t.Fatalf("fleet agent release list: %q", out)
	}
	var probes []func() (time.Duration, int, int)
	for _, id := range ids {
		probes = append(probes, startInferProbe(t, "http://"+f.listens[id]+"/v2/models/grid-anomaly/infer"))
	}
	out := f.fleetCLI("rollout", "create", "--agent-release", suGood, "-l", "su=good", "--waves", "1,100%", "--soak", "1s", "--name", "agent-good", "-o", "json")
	if !strings.Contains(out, `"agent-good"`) {
		t.Fatalf("fleet rollout create printed %q", out)
	}
	r := f.waitPhase("agent-good", 120*time.Second, "succeeded")
	f.onVersion(suGood, 10*time.Second, ids...)
	var gaps []time.Duration
	for i, stop := range probes {
		// The agent did restart (its version changed above); with the
		// listening socket handed over, calls made meanwhile wait in its
		// backlog instead of failing, so the gap may have no failure.
		longest, failed, total := stop()
		if longest <= 0 || total == 0 {
			t.Fatalf("%s: the probe made %d calls", ids[i], total)
		}
		gaps = append(gaps, longest)
		t.Logf("%s: local endpoint downtime across the agent update: longest gap %s, %d of %d probes failed", ids[i], longest.Round(time.Millisecond), failed, total)
		// Where the gap went: the agent logs its restart's steps
		// (update.Trace) at its first answer after the exec.
		t.Logf("%s: TRACE %s", ids[i], f.restartTrace(ids[i]))
		// The new binary compiled the model into the cache before the
		// swap, while the old one served.
		if pre := f.lastLogged(ids[i], "models precompiled by the new binary"); pre == "" {
			t.Fatalf("%s: the new binary did not precompile the model before the swap\n%s", ids[i], f.logTail(ids[i]+".log"))
		}
	}
	if len(r.Waves) != 2 {
		t.Fatalf("rollout had %d waves, want 2: %+v", len(r.Waves), r.Waves)
	}
	for _, id := range ids {
		if v := f.binaryVersion(f.exes[id]); v != suGood {
			t.Fatalf("%s: binary on disk is %s, want %s", id, v, suGood)
		}
		if v := f.binaryVersion(update.OldPath(f.exes[id])); v != suBase {
			t.Fatalf("%s: previous binary kept beside it is %s, want %s", id, v, suBase)
		}
	}
	if got := f.infer(ids[0], 2); got != "1.0.0" {
		t.Fatalf("model after the update answered as %s", got)
	}
	// Baseline, same run: the same agent restarted the way a service
	// manager restarts it (SIGTERM, then a new process).
	stop := startInferProbe(t, "http://"+f.listens[ids[0]]+"/v2/models/grid-anomaly/infer")
	if err := f.agents[ids[0]].Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	f.startSupervised(ids[0], "su=good")
	f.onVersion(suGood, 30*time.Second, ids[0])
	f.infer(ids[0], 1)
	longest, failed, total := stop()
	t.Logf("%s: baseline TRACE %s", ids[0], f.lastLogged(ids[0], "agent start timing"))
	slices.Sort(gaps)
	t.Logf("DOWNTIME median of %d agents: self-update %s; baseline stop-and-start restart %s (%d of %d probes failed)",
		len(gaps), gaps[len(gaps)/2].Round(time.Millisecond), longest.Round(time.Millisecond), failed, total)
}

// restartTrace returns the step timings of agent id's last self-update
// restart from its log, and fails the test when it logged none.
func (f *suFleet) restartTrace(id string) string {
	f.t.Helper()
	last := f.lastLogged(id, "self-update restart timing")
	if !strings.Contains(last, " gap=") || !strings.Contains(last, update.StepFirstAnswer+"=") {
		f.t.Fatalf("%s logged no complete restart timing (%q)\n%s", id, last, f.logTail(id+".log"))
	}
	return last
}

// lastLogged returns what follows msg on the last line of agent id's log
// that holds it ("" when none does).
func (f *suFleet) lastLogged(id, msg string) string {
	f.t.Helper()
	b, err := os.ReadFile(filepath.Join(f.dir, id+".log"))
	if err != nil {
		f.t.Fatal(err)
	}
	var last string
	for line := range strings.Lines(string(b)) {
		if _, after, ok := strings.Cut(line, msg); ok {
			last = strings.TrimSpace(after)
		}
	}
	return last
}

// startInferProbe calls url every 2 ms until the returned function is
// called, which answers the longest time without a successful answer and
// the counts of failed and all probes.
func startInferProbe(t *testing.T, url string) func() (time.Duration, int, int) {
	body := `{"inputs":[{"name":"readings","shape":[1,4],"datatype":"FP32","data":[230,10,50,35]}]}`
	c := &http.Client{Timeout: 500 * time.Millisecond}
	stop := make(chan struct{})
	done := make(chan struct{})
	var longest time.Duration
	var failed, total int
	go func() {
		defer close(done)
		lastOK := time.Now()
		for {
			select {
			case <-stop:
				return
			default:
			}
			total++
			resp, err := c.Post(url, "application/json", strings.NewReader(body))
			ok := err == nil && resp.StatusCode == http.StatusOK
			if resp != nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			now := time.Now()
			if ok {
				longest = max(longest, now.Sub(lastOK))
				lastOK = now
			} else {
				failed++
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return func() (time.Duration, int, int) {
		close(stop)
		<-done
		return longest, failed, total
	}
}

// TestAgentSelfUpdateBadReleasesUndone: a release that exits at start and
// one that never connects are both undone by the watchdog within 60 s;
// the agent is back on the old version, its binary on disk is the old one,
// and each rollout stops at its first wave.
func TestAgentSelfUpdateBadReleasesUndone(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startSelfUpdateFleet(t)
	ids := []string{"su-bad-1", "su-bad-2"}
	for _, id := range ids {
		f.startSupervised(id, "su=bad")
	}
	f.onVersion(suBase, 30*time.Second, ids...)
	// The base version is a release too, so a rollback can name it.
	f.push(agentBin(suBase, ""), suBase)
	f.push(agentBin(suExit, "exit"), suExit)
	f.push(agentBin(suNoConnect, "noconnect"), suNoConnect)

	for _, c := range []struct{ name, version, onFailure, why string }{
		{"agent-exit", suExit, "stop", "exit status 3"},
		{"agent-noconnect", suNoConnect, "rollback", "deadline"},
	} {
		start := time.Now()
		id := f.rollout(c.name, c.version, "su=bad", c.onFailure, "1", "100%")
		r := f.waitPhase(id, 60*time.Second, "aborted", "rolled-back")
		took := time.Since(start)
		var touched string
		devs, err := f.client.RolloutDevices(context.Background(), id, "", -1)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range devs {
			if d.Step != "pending" {
				touched = d.Device
			}
		}
		if touched == "" || r.Failures != 1 {
			t.Fatalf("%s: want one device of the first wave failed, got %+v %+v", c.name, r, devs)
		}
		f.onVersion(suBase, 30*time.Second, ids...)
		d, err := f.client.Device(context.Background(), touched)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(d.AgentUpdate.LastError, c.why) || !strings.Contains(d.AgentUpdate.LastError, c.version) {
			t.Fatalf("%s: device reports %+v; want the watchdog's reason (%s)", c.name, d.AgentUpdate, c.why)
		}
		for _, id := range ids {
			if v := f.binaryVersion(f.exes[id]); v != suBase {
				t.Fatalf("%s: %s runs %s from disk, want %s", c.name, id, v, suBase)
			}
		}
		t.Logf("%s: undone and rollout %s after %s (%s)", c.name, r.Phase, took.Round(100*time.Millisecond), d.AgentUpdate.LastError)
	}
}

// TestAgentSelfUpdateRefusals: a release signed by an untrusted key, an
// older version than installed, and a version built only for another
// architecture are refused before anything is replaced.
func TestAgentSelfUpdateRefusals(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startSelfUpdateFleet(t)
	const id = "su-refuse-1"
	f.startSupervised(id, "su=refuse")
	f.onVersion(suBase, 30*time.Second, id)
	before := fileSHA(t, f.exes[id])

	// 1.4.0 signed by a key the agent does not trust.
	other := filepath.Join(f.dir, "other-keys")
	f.fleetCLI("keys", "init", "--dir", other)
	f.fleetCLI("agent", "release", "push", agentBin(suGood, ""), "--version", "1.4.0", "--key", filepath.Join(other, "release.key"))
	// 0.9.0, older than the installed 1.0.0, signed correctly.
	f.push(agentBin(suBase, ""), "0.9.0")
	// 1.5.0 for arm64 only (the CLI checks the ELF header, so this one is
	// signed here and uploaded through the API).
	priv, err := trust.ReadPrivateKey(filepath.Join(f.keys, "release.key"))
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(agentBin(suGood, ""))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(bin)
	doc, err := release.Sign(priv, release.Manifest{Version: "1.5.0", OS: "linux", Arch: "arm64", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(bin))})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := doc.Encode()
	if _, err := f.client.PushAgentRelease(context.Background(), raw, strings.NewReader(string(bin))); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ name, version, why string }{
		{"agent-untrusted", "1.4.0", "unknown key"},
		{"agent-older", "0.9.0", "version floor"},
		{"agent-wrong-arch", "1.5.0", "no build for linux/amd64"},
	} {
		rid := f.rollout(c.name, c.version, "su=refuse", "stop", "100%")
		f.waitPhase(rid, 60*time.Second, "aborted")
		f.eventually(c.name+" refusal reported", 20*time.Second, func() (bool, string) {
			d, err := f.client.Device(context.Background(), id)
			if err != nil {
				return false, err.Error()
			}
			return d.AgentUpdate != nil && strings.Contains(d.AgentUpdate.LastError, c.why), fmt.Sprintf("%+v", d.AgentUpdate)
		})
		if got := fileSHA(t, f.exes[id]); got != before {
			t.Fatalf("%s: the agent binary was replaced", c.name)
		}
		for _, p := range []string{update.OldPath(f.exes[id]), filepath.Join(filepath.Dir(f.exes[id]), ".fleet-agent.new")} {
			if _, err := os.Stat(p); err == nil {
				t.Fatalf("%s: %s exists: something was staged or swapped", c.name, p)
			}
		}
		f.onVersion(suBase, 10*time.Second, id)
	}
}

var childPidRE = regexp.MustCompile(`msg="agent started".* pid=(\d+)`)

// alive reports whether process pid runs (a zombie does not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...: the state follows the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || (b[i+2] != 'Z' && b[i+2] != 'X')
}

// TestAgentSelfUpdateSIGKILL kills the agent, or its supervisor with it,
// at a random moment of an update, on several agents at once, and checks
// that the binary on disk runs before and after they come back, and that
// each ends healthy on the old or the new version.
func TestAgentSelfUpdateSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f := startSelfUpdateFleet(t)
	f.push(agentBin(suGood, ""), suGood)
	const n = 4
	seed := time.Now().UnixNano()
	t.Logf("kill moments seeded with %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 8))
	type plan struct {
		id         string
		delay      time.Duration
		supervisor bool
	}
	var plans []plan
	for i := range n {
		p := plan{id: fmt.Sprintf("su-kill-%d", i), delay: time.Duration(rng.Int64N(int64(4 * time.Second))), supervisor: i%2 == 1}
		plans = append(plans, p)
		f.startSupervised(p.id, "kill="+strconv.Itoa(i))
	}
	ids := make([]string, n)
	for i, p := range plans {
		ids[i] = p.id
	}
	f.onVersion(suBase, 30*time.Second, ids...)
	for i, p := range plans {
		f.rollout("agent-kill-"+strconv.Itoa(i), suGood, "kill="+strconv.Itoa(i), "stop", "100%")
		time.Sleep(p.delay / n) // spread the starts too
	}
	var wg sync.WaitGroup
	for _, p := range plans {
		wg.Go(func() {
			time.Sleep(p.delay)
			b, _ := os.ReadFile(filepath.Join(f.dir, p.id+".log"))
			m := childPidRE.FindAllSubmatch(b, -1)
			if len(m) == 0 {
				t.Errorf("%s: no child pid in the supervisor's log", p.id)
				return
			}
			child, _ := strconv.Atoi(string(m[len(m)-1][1]))
			what := "agent"
			if p.supervisor {
				what = "supervisor and agent"
				f.agents[p.id].Kill()
				// The agent must die with its supervisor (also after it
				// re-executed itself), or it would hold the port and the
				// broker session against the next one.
				deadline := time.Now().Add(10 * time.Second)
				for alive(child) && time.Now().Before(deadline) {
					time.Sleep(20 * time.Millisecond)
				}
				if alive(child) {
					t.Errorf("%s: agent pid %d outlived its supervisor", p.id, child)
					syscall.Kill(child, syscall.SIGKILL)
				}
			} else {
				syscall.Kill(child, syscall.SIGKILL)
			}
			v, err := update.BinaryVersion(context.Background(), f.exes[p.id])
			if err != nil || (v != suBase && v != suGood) {
				t.Errorf("%s: after SIGKILL of the %s %s into the update, the binary on disk does not run: %q, %v", p.id, what, p.delay, v, err)
			}
			t.Logf("%s: killed the %s %s after its rollout started; binary on disk runs %s", p.id, what, p.delay.Round(time.Millisecond), v)
		})
	}
	wg.Wait()
	for _, p := range plans {
		if p.supervisor {
			f.startSupervised(p.id, "kill="+strings.TrimPrefix(p.id, "su-kill-"))
		}
	}
	// Each ends healthy on one of the two versions, running from disk
	// what it reports.
	f.eventually("every killed agent back and settled", 90*time.Second, func() (bool, string) {
		for _, id := range ids {
			d, err := f.client.Device(context.Background(), id)
			if err != nil {
				return false, err.Error()
			}
			settled := d.Online && d.AgentUpdate != nil && d.AgentUpdate.Healthy && d.AgentUpdate.Pending == "" &&
				(d.AgentVersion == suGood || d.AgentVersion == suBase)
			if !settled {
				return false, fmt.Sprintf("%s: %s online=%v %+v", id, d.AgentVersion, d.Online, d.AgentUpdate)
			}
		}
		return true, ""
	})
	for _, id := range ids {
		d, _ := f.client.Device(context.Background(), id)
		if v := f.binaryVersion(f.exes[id]); v != d.AgentVersion {
			t.Fatalf("%s reports %s but its binary on disk is %s", id, d.AgentVersion, v)
		}
		t.Logf("%s settled on %s (%+v)", id, d.AgentVersion, d.AgentUpdate)
	}
}
