package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/models/modeltest"
	"github.com/edgefleet/edgefleet/scripts/internal/agentbuild"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// binDir holds the binaries built once for all tests of the package.
var binDir string

func TestMain(m *testing.M) {
	code := func() int {
		dir, err := os.MkdirTemp("", "edgefleet-e2e-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		binDir = dir
		return m.Run()
	}()
	os.Exit(code)
}

// buildBinaries builds the three programs once (not in TestMain, so that
// `go test -short` and `-run` of other tests stay fast).
func buildBinaries(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(binDir, "fleet-agent")); err == nil {
		return
	}
	cmd := exec.Command("go", "build", "-o", binDir+"/",
		"github.com/edgefleet/edgefleet/controller/cmd/fleet-controller",
		"github.com/edgefleet/edgefleet/fleet/cmd/fleet")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	// The agent as `make build` builds it (scripts/internal/agentbuild).
	cmd = agentbuild.Command(context.Background(), "", filepath.Join(binDir, "fleet-agent"), agentbuild.Options{})
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build fleet-agent: %v\n%s", err, out)
	}
}

// fleet is one running controller with its agents.
type fleet struct {
	t       *testing.T
	dir     string
	broker  string // tcp://127.0.0.1:port
	api     string // http://127.0.0.1:port
	ctrl    *proc.Process
	agents  map[string]*proc.Process
	listens map[string]string
	client  *client.Client
	// token is the controller's first admin token (DATA/admin.token).
	token string
	// agentFlags, when set, adds flags to each agent's command line (TLS).
	agentFlags func(id string) []string
	// external: the controller uses the broker at broker (--broker), not
	// its embedded one.
	external bool
}

func port(t *testing.T) int {
	t.Helper()
	p, err := proc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// startController starts fleet-controller; with external == "" it runs its
// embedded broker, else it uses the broker at that URL. extra flags go to
// the controller as they are.
func startController(t *testing.T, external string, extra ...string) *fleet {
	t.Helper()
	buildBinaries(t)
	f := &fleet{t: t, dir: t.TempDir(), agents: map[string]*proc.Process{}, listens: map[string]string{}}
	httpAddr := fmt.Sprintf("127.0.0.1:%d", port(t))
	f.api = "http://" + httpAddr
	args := []string{"--data", filepath.Join(f.dir, "controller"), "--http-listen", httpAddr}
	if external == "" {
		mqttAddr := fmt.Sprintf("127.0.0.1:%d", port(t))
		f.broker = "tcp://" + mqttAddr
		args = append(args, "--mqtt-listen", mqttAddr)
	} else {
		f.broker, f.external = external, true
		args = append(args, "--broker", external)
	}
	args = append(args, extra...)
	p, err := proc.Start("fleet-controller", filepath.Join(f.dir, "controller.log"), filepath.Join(binDir, "fleet-controller"), args...)
	if err != nil {
		t.Fatal(err)
	}
	f.ctrl = p
	t.Cleanup(func() { f.stopAll() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.WaitHTTP(ctx, f.api+"/healthz"); err != nil {
		t.Fatal(err, "\n", f.logTail("controller.log"))
	}
	// A new controller writes its first admin token; the tests act with it.
	tok, err := os.ReadFile(filepath.Join(f.dir, "controller", "admin.token"))
	if err != nil {
		t.Fatalf("the controller wrote no admin token: %v\n%s", err, f.logTail("controller.log"))
	}
	f.token = strings.TrimSpace(string(tok))
	if f.client, err = client.New(f.api, f.token); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fleet) startAgent(id string, labels ...string) {
	f.t.Helper()
	listen := fmt.Sprintf("127.0.0.1:%d", port(f.t))
	args := []string{"--id", id, "--data", filepath.Join(f.dir, id), "--listen", listen, "--broker", f.broker, "--controller", f.api}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	args = append(args, f.trustFlags(id)...)
	p, err := proc.Start(id, filepath.Join(f.dir, id+".log"), filepath.Join(binDir, "fleet-agent"), args...)
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

// trustFlags returns agentFlags(id), and --allow-unsigned unless they
// give the agent both keys: an agent refuses to start without both keys
// or that flag. The tests of signatures (trust_test.go, rotation_test.go)
// give both keys; the others run their agents explicitly unsigned.
func (f *fleet) trustFlags(id string) []string {
	var extra []string
	if f.agentFlags != nil {
		extra = f.agentFlags(id)
	}
	if !slices.Contains(extra, "--release-key") || !slices.Contains(extra, "--director-key") {
		extra = append(extra, "--allow-unsigned")
	}
	return extra
}

func (f *fleet) stopAll() {
	for id, p := range f.agents {
		if err := p.Stop(10 * time.Second); err != nil {
			f.t.Errorf("agent %s: %v\n%s", id, err, f.logTail(id+".log"))
		}
	}
	if f.ctrl != nil {
		if err := f.ctrl.Stop(10 * time.Second); err != nil {
			f.t.Errorf("controller: %v\n%s", err, f.logTail("controller.log"))
		}
	}
}

func (f *fleet) logTail(name string) string {
	b, _ := os.ReadFile(filepath.Join(f.dir, name))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return fmt.Sprintf("--- %s (tail) ---\n%s", name, b)
}

func (f *fleet) logs() string {
	var sb strings.Builder
	sb.WriteString(f.logTail("controller.log"))
	for id := range f.agents {
		sb.WriteString("\n" + f.logTail(id+".log"))
	}
	return sb.String()
}

// eventually polls cond every 100 ms until it holds or timeout passes.
func (f *fleet) eventually(what string, timeout time.Duration, cond func() (bool, string)) {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.t.Fatalf("timed out after %s waiting for %s; last: %s\n%s", timeout, what, last, f.logs())
}

func (f *fleet) devices(sel string) []client.Device {
	ds, err := f.client.Devices(context.Background(), sel)
	if err != nil {
		f.t.Fatalf("devices %q: %v", sel, err)
	}
	return ds
}

// infer posts one request with n rows to an agent and returns the model
// version that answered.
func (f *fleet) infer(id string, rows int) string {
	f.t.Helper()
	data := make([]float32, 0, rows*4)
	for i := range rows {
		data = append(data, 230+float32(i%7), 10, 50, 35)
	}
	body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "readings", "shape": []int{rows, 4}, "datatype": "FP32", "data": data}}})
	resp, err := http.Post("http://"+f.listens[id]+"/v2/models/grid-anomaly/infer", "application/json", bytes.NewReader(body))
	if err != nil {
		f.t.Fatalf("infer on %s: %v", id, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		f.t.Fatalf("infer on %s: %d %s", id, resp.StatusCode, b)
	}
	var out struct {
		ModelVersion string `json:"model_version"`
		Outputs      []struct {
			Name  string    `json:"name"`
			Shape []int     `json:"shape"`
			Data  []float64 `json:"data"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		f.t.Fatalf("infer on %s: %v in %s", id, err, b)
	}
	if len(out.Outputs) != 1 || out.Outputs[0].Name != "score" || len(out.Outputs[0].Data) != rows {
		f.t.Fatalf("infer on %s: want one output \"score\" with %d values, got %s", id, rows, b)
	}
	for _, s := range out.Outputs[0].Data {
		if s < 0 || s > 1 {
			f.t.Fatalf("infer on %s: score %v outside [0,1]", id, s)
		}
	}
	return out.ModelVersion
}

// fleetCLI runs the real fleet binary against this controller and returns
// its standard output; a non-zero exit fails the test.
func (f *fleet) fleetCLI(args ...string) string {
	f.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "fleet"), args...)
	cmd.Env = append(os.Environ(), "EDGEFLEET_CONTROLLER="+f.api, "EDGEFLEET_TOKEN="+f.token)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		f.t.Fatalf("fleet %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// pushExample builds the example model at version from source and pushes it.
func (f *fleet) pushExample(version string) *client.Model {
	f.t.Helper()
	m, err := f.client.PushModel(context.Background(), modeltest.BuildExample(f.t, "grid-anomaly", version))
	if err != nil {
		f.t.Fatalf("push grid-anomaly@%s: %v", version, err)
	}
	return m
}

func (f *fleet) waitActive(version string, ids ...string) {
	f.t.Helper()
	f.eventually("grid-anomaly@"+version+" active on "+strings.Join(ids, ","), 90*time.Second, func() (bool, string) {
		for _, id := range ids {
			d, err := f.client.Device(context.Background(), id)
			if err != nil {
				return false, err.Error()
			}
			if got := d.Active("default").String(); got != "grid-anomaly@"+version {
				return false, id + " runs " + got
			}
		}
		return true, ""
	})
}

// runSkeleton is the walking skeleton's whole path: two agents come online
// with their labels, a model is pushed and assigned by selector, it
// activates only where the selector matched, inferences run on the devices,
// and every one of them is counted once at the controller.
func runSkeleton(t *testing.T, f *fleet) {
	f.startAgent("e2e-eu-1", "region=eu", "hw=jetson")
	f.startAgent("e2e-us-1", "region=us", "hw=rpi5")
	f.eventually("both agents online", 30*time.Second, func() (bool, string) {
		ds := f.devices("")
		online := 0
		for _, d := range ds {
			if d.Online {
				online++
			}
		}
		return online == 2, fmt.Sprintf("%d of %d online", online, len(ds))
	})
	if ds := f.devices("region=eu,hw in (jetson)"); len(ds) != 1 || ds[0].ID != "e2e-eu-1" {
		t.Fatalf("selector region=eu,hw in (jetson) matched %v", ds)
	}

	// 1.0.0 goes through the API client, 1.1.0 through the fleet CLI.
	f.pushExample("1.0.0")
	bundlePath := filepath.Join(f.dir, "grid-anomaly-1.1.0.bundle")
	if err := os.WriteFile(bundlePath, modeltest.BuildExample(t, "grid-anomaly", "1.1.0"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := f.fleetCLI("model", "push", bundlePath); !strings.Contains(out, "pushed grid-anomaly@1.1.0") {
		t.Fatalf("fleet model push printed %q", out)
	}
	ctx := context.Background()
	ids, err := f.client.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "region in (eu,us)"})
	if err != nil || len(ids) != 2 {
		t.Fatalf("assign 1.0.0: %v %v", ids, err)
	}
	f.waitActive("1.0.0", "e2e-eu-1", "e2e-us-1")

	// Only the EU device moves to 1.1.0.
	if out := f.fleetCLI("assign", "grid-anomaly@1.1.0", "-l", "region=eu"); !strings.Contains(out, "to 1 device(s): e2e-eu-1") {
		t.Fatalf("fleet assign printed %q", out)
	}
	f.waitActive("1.1.0", "e2e-eu-1")
	var listed struct{ Devices []client.Device }
	if err := json.Unmarshal([]byte(f.fleetCLI("devices", "-l", "region=us", "-o", "json")), &listed); err != nil || len(listed.Devices) != 1 ||
		listed.Devices[0].ID != "e2e-us-1" || listed.Devices[0].Active("default").String() != "grid-anomaly@1.0.0" {
		t.Fatalf("fleet devices -l region=us -o json: %+v %v", listed, err)
	}
	if out := f.fleetCLI("device", "e2e-eu-1"); !strings.Contains(out, "active grid-anomaly@1.1.0") || !strings.Contains(out, "previous grid-anomaly@1.0.0") {
		t.Fatalf("fleet device e2e-eu-1 printed:\n%s", out)
	}
	if got := f.infer("e2e-us-1", 1); got != "1.0.0" {
		t.Fatalf("us device answered with %s, want 1.0.0 (it was not targeted)", got)
	}

	const requests = 40
	for i := range requests {
		if v := f.infer("e2e-eu-1", 1+i%3); v != "1.1.0" {
			t.Fatalf("eu device answered with %s, want 1.1.0", v)
		}
	}
	for range requests - 1 { // one already sent above
		f.infer("e2e-us-1", 2)
	}
	// Each request is one inference record; the controller must count
	// exactly as many as were made: none lost, none twice.
	f.eventually("inferences counted at the controller", 60*time.Second, func() (bool, string) {
		var got []string
		ok := true
		for _, id := range []string{"e2e-eu-1", "e2e-us-1"} {
			d, err := f.client.Device(ctx, id)
			if err != nil {
				return false, err.Error()
			}
			got = append(got, fmt.Sprintf("%s=%d (spool %d)", id, d.Inferences, d.SpoolDepth))
			if d.Inferences > requests {
				t.Fatalf("%s: controller counted %d inferences, only %d were made", id, d.Inferences, requests)
			}
			ok = ok && d.Inferences == requests && d.InferenceErrors == 0
		}
		return ok, strings.Join(got, ", ")
	})

	// Bad input on every topic either side subscribes to: logged and
	// dropped, nothing crashes, both sides keep working.
	garbage(t, f.broker, []string{
		"ef/v1/dev/e2e-eu-1/hello", "ef/v1/dev/e2e-eu-1/state", "ef/v1/dev/e2e-eu-1/presence",
		"ef/v1/dev/e2e-eu-1/events", "ef/v1/dev/e2e-eu-1/telemetry",
		"ef/v1/dev/e2e-eu-1/desired", "ef/v1/dev/e2e-eu-1/ack", "ef/v1/dev/e2e-eu-1/cmd",
	})
	time.Sleep(500 * time.Millisecond)
	for name, p := range map[string]*proc.Process{"controller": f.ctrl, "e2e-eu-1": f.agents["e2e-eu-1"]} {
		if done, err := p.Exited(); done {
			t.Fatalf("%s exited after malformed payloads: %v\n%s", name, err, f.logs())
		}
	}
	if v := f.infer("e2e-eu-1", 1); v != "1.1.0" {
		t.Fatalf("after malformed payloads the eu device answered with %s", v)
	}
	if err := f.client.Healthz(ctx); err != nil {
		t.Fatalf("controller after malformed payloads: %v", err)
	}
	d, err := f.client.Device(ctx, "e2e-eu-1")
	if err != nil || d.Active("default").String() != "grid-anomaly@1.1.0" {
		t.Fatalf("after malformed payloads the controller reports %v (%v)", d, err)
	}
	for _, log := range []string{"controller.log", "e2e-eu-1.log"} {
		b, _ := os.ReadFile(filepath.Join(f.dir, log))
		if !bytes.Contains(b, []byte("ef/v1/dev/e2e-eu-1/")) {
			t.Errorf("%s does not name the topic of the malformed payloads it dropped", log)
		}
	}
}

// garbage publishes a malformed payload on each topic. A retained one on
// desired is cleared afterwards, so it does not outlive the test.
func garbage(t *testing.T, broker string, topics []string) {
	t.Helper()
	opts := mqtt.NewClientOptions().AddBroker(broker).SetClientID("e2e-vandal").SetConnectTimeout(5 * time.Second)
	c := mqtt.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", broker, tok.Error())
	}
	defer c.Disconnect(250)
	for _, topic := range topics {
		for _, payload := range [][]byte{{0xff, 0x00, 0x13, 0x37}, []byte("not protobuf at all")} {
			if tok := c.Publish(topic, 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
				t.Fatalf("publish %s: %v", topic, tok.Error())
			}
		}
	}
}

func TestSkeletonEmbeddedBroker(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	runSkeleton(t, startController(t, ""))
}

func TestSkeletonMosquitto(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	url := startMosquitto(t)
	runSkeleton(t, startController(t, url))
}
