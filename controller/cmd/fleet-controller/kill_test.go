package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/internal/testdevice"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// controllerProc is the real fleet-controller binary running on fixed
// ports, so it can be killed and started again in its place.
type controllerProc struct {
	t          *testing.T
	bin, data  string
	http, mqtt string
	logPath    string
	cmd        *exec.Cmd
	done       chan struct{}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func buildController(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "fleet-controller")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

func newControllerProc(t *testing.T, bin string) *controllerProc {
	dir := t.TempDir()
	p := &controllerProc{t: t, bin: bin, data: filepath.Join(dir, "data"), http: freeAddr(t), mqtt: freeAddr(t), logPath: filepath.Join(dir, "controller.log")}
	t.Cleanup(func() {
		if p.cmd != nil {
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				p.cmd.Process.Kill()
				<-p.done
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(p.logPath)
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("--- controller log (tail) ---\n%s", b)
		}
	})
	return p
}

func (p *controllerProc) start() {
	p.t.Helper()
	log, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := exec.Command(p.bin, "--data", p.data, "--http-listen", p.http, "--mqtt-listen", p.mqtt, "--log-level", "info")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); log.Close(); close(p.done) }()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://" + p.http + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-p.done:
			p.t.Fatalf("controller exited during start: %v", cmd.ProcessState)
		case <-time.After(20 * time.Millisecond):
		}
	}
	p.t.Fatal("controller not healthy within 20s")
}

// kill sends SIGKILL: no shutdown code runs.
func (p *controllerProc) kill() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		p.t.Fatal(err)
	}
	<-p.done
	p.cmd = nil
}

func (p *controllerProc) call(method, path string, body []byte, out any) (int, error) {
	tok, err := os.ReadFile(filepath.Join(p.data, "admin.token"))
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequest(method, "http://"+p.http+path, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode >= 300 {
		return resp.StatusCode, fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		return resp.StatusCode, json.Unmarshal(b, out)
	}
	return resp.StatusCode, nil
}

func (p *controllerProc) mustCall(method, path string, body []byte, out any) {
	p.t.Helper()
	if _, err := p.call(method, path, body, out); err != nil {
		p.t.Fatal(err)
	}
}

// rolloutView is the part of GET /v1/rollouts/{id} this test compares.
type rolloutView struct {
	Phase    string         `json:"phase"`
	Wave     int            `json:"wave"`
	Failures int            `json:"failures"`
	Steps    map[string]int `json:"steps"`
	Waves    []struct {
		State string         `json:"state"`
		Steps map[string]int `json:"steps"`
	} `json:"waves"`
}

type deviceView struct {
	Device string `json:"device"`
	Wave   int    `json:"wave"`
	Step   string `json:"step"`
}

// runKillScenario runs a rollout over fake agents against a real
// controller process, killing it with SIGKILL at random moments (kills
// times) and starting it again, and returns the final rollout, its
// device steps, and what each agent ran.
func runKillScenario(t *testing.T, bin string, kills int, rng *rand.Rand) (rolloutView, []deviceView, map[string][]string) {
	p := newControllerProc(t, bin)
	p.start()
	var v1 *pb.ModelRef
	for _, v := range []string{"1.0.0", "2.0.0"} {
		spec := []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{-1, 3}}}
		b, err := bundle.New(bundle.Manifest{ABI: 1, Name: "m", Version: v, Inputs: spec, Outputs: spec}, []byte("module "+v))
		if err != nil {
			t.Fatal(err)
		}
		data, err := b.Encode()
		if err != nil {
			t.Fatal(err)
		}
		p.mustCall("POST", "/v1/models", data, nil)
		if v == "1.0.0" {
			v1 = &pb.ModelRef{Name: "m", Version: v, BundleSha256: b.Digest}
		}
	}

	const n = 30
	agents := make([]*testdevice.Agent, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			agents[i] = testdevice.StartAgent(t, "tcp://"+p.mqtt, fmt.Sprintf("kd-%03d", i), map[string]string{"fleet": "k"}, v1, nil)
		})
	}
	wg.Wait()
	waitFor(t, "every device known", func() (bool, string) {
		var l struct {
			Devices []struct {
				Online bool `json:"online"`
			} `json:"devices"`
		}
		if _, err := p.call("GET", "/v1/devices?selector=fleet%3Dk", nil, &l); err != nil {
			return false, err.Error()
		}
		on := 0
		for _, d := range l.Devices {
			if d.Online {
				on++
			}
		}
		return on == n, fmt.Sprintf("%d of %d online", on, n)
	})
	p.mustCall("POST", "/v1/rollouts", []byte(`{"name":"kill","selector":"fleet=k","model":"m@2.0.0",
		"strategy":{"waves":["10%","30%","60%","100%"],"soak":"300ms","maxConcurrentDownloads":5}}`), nil)

	for i := range kills {
		time.Sleep(time.Duration(50+rng.IntN(500)) * time.Millisecond)
		var r rolloutView
		p.call("GET", "/v1/rollouts/kill", nil, &r)
		t.Logf("kill %d: rollout %s, wave %d, steps %v", i+1, r.Phase, r.Wave, r.Steps)
		p.kill()
		p.start()
	}
	var final rolloutView
	waitFor(t, "the rollout to finish", func() (bool, string) {
		final = rolloutView{} // decoding into a map merges keys
		if _, err := p.call("GET", "/v1/rollouts/kill", nil, &final); err != nil {
			return false, err.Error()
		}
		return final.Phase == "succeeded" || final.Phase == "rolled-back" || final.Phase == "aborted", fmt.Sprintf("%+v", final)
	})
	var devs struct {
		Devices []deviceView `json:"devices"`
	}
	p.mustCall("GET", "/v1/rollouts/kill/devices", nil, &devs)
	ran := map[string][]string{}
	for _, a := range agents {
		ran[a.ID] = a.History()
	}
	return final, devs.Devices, ran
}

func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var why string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, why = cond(); ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s: %s", what, why)
}

// TestRolloutSurvivesKill9 kills the real controller with SIGKILL at ten
// random moments of a rollout, restarting it each time: the rollout
// completes with the same final state as an uninterrupted run, and no
// device was ever sent anything outside its policy (each installed the new
// version exactly once).
func TestRolloutSurvivesKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the controller binary")
	}
	bin := buildController(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	var (
		want     rolloutView
		wantDevs []deviceView
		wantRan  map[string][]string
	)
	t.Run("uninterrupted", func(t *testing.T) { want, wantDevs, wantRan = runKillScenario(t, bin, 0, rng) })
	if t.Failed() {
		return
	}
	got, gotDevs, gotRan := runKillScenario(t, bin, 10, rng)
	if want.Phase != "succeeded" || want.Steps["healthy"] != 30 {
		t.Fatalf("uninterrupted run ended %+v", want)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("final rollout after 10 kills = %+v\nuninterrupted = %+v", got, want)
	}
	if !reflect.DeepEqual(gotDevs, wantDevs) {
		t.Fatalf("device steps after 10 kills = %+v\nuninterrupted = %+v", gotDevs, wantDevs)
	}
	for id, h := range gotRan {
		if !reflect.DeepEqual(h, []string{"2.0.0"}) || !reflect.DeepEqual(wantRan[id], h) {
			t.Fatalf("device %s ran %v after kills, %v uninterrupted; want [2.0.0]", id, h, wantRan[id])
		}
	}
}
