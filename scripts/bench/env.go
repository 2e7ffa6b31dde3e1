package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/fleet/sim"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/scripts/internal/agentbuild"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// env is what every benchmark shares: the binaries, the models, a working
// directory for data and logs.
type env struct {
	cfg       config
	work      string
	bin       string
	mosquitto string
	log       *slog.Logger
	// models holds bundle files by "name@version", signed with the
	// release key whose public key file is releaseKey.
	models     map[string][]byte
	releaseKey string
	release    ed25519.PrivateKey
	seq        int
}

// benchModel is the model the benchmarks deploy: an XGBoost ensemble
// compiled by models/compiler into a 10 KB module, the kind of model a
// fleet runs (the 2.8 MB Go guest is not).
const benchModel = "fraud-score"

// build compiles the three programs as `make build` does: static,
// stripped, trimmed, and fleet-agent with the agent's own flags
// (scripts/internal/agentbuild), so the agent measured is the one shipped.
func (e *env) build(ctx context.Context) error {
	e.bin = filepath.Join(e.work, "bin")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", e.bin+"/", "./fleet/cmd/fleet")
	cmd.Dir = e.cfg.root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out)
	}
	cmd = exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-tags", e.cfg.controllerTags, "-o", e.bin+"/", "./controller/cmd/fleet-controller")
	cmd.Dir = e.cfg.root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build fleet-controller (-tags %q): %w\n%s", e.cfg.controllerTags, err, out)
	}
	cmd = agentbuild.Command(ctx, e.cfg.root, filepath.Join(e.bin, "fleet-agent"), agentbuild.Options{})
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build fleet-agent: %w\n%s", err, out)
	}
	return nil
}

// buildModels compiles the benchmark model at the versions the
// benchmarks use, each signed with a release key made for the run, whose
// public half every device pins (releaseKey): the devices check what they
// would check in the field.
func (e *env) buildModels() error {
	e.models = map[string][]byte{}
	spec, err := compiler.ReadSpec(filepath.Join(e.cfg.root, "models", "examples", benchModel))
	if err != nil {
		return err
	}
	pub, priv, err := trust.GenerateKey()
	if err != nil {
		return err
	}
	e.release = priv
	pem, err := trust.MarshalPublicKey(pub)
	if err != nil {
		return err
	}
	e.releaseKey = filepath.Join(e.work, "release.pub")
	if err := os.WriteFile(e.releaseKey, pem, 0o644); err != nil {
		return err
	}
	for _, v := range e.cfg.versions() {
		spec.Version = v
		r, err := spec.Build()
		if err != nil {
			return fmt.Errorf("compile %s %s: %w", benchModel, v, err)
		}
		data, err := e.sign(r.Bundle)
		if err != nil {
			return err
		}
		e.models[benchModel+"@"+v] = data
	}
	return nil
}

// sign signs a bundle with the run's release key (its only signature)
// and encodes it.
func (e *env) sign(b *bundle.Bundle) ([]byte, error) {
	sig := trust.Sign(e.release, trust.DomainBundleManifest, b.ManifestJSON)
	var err error
	if b.Signature, err = trust.EncodeSignatures([]trust.Signature{sig}); err != nil {
		return nil, err
	}
	return b.Encode()
}

// dir returns a new directory under the working directory.
func (e *env) dir(name string) string {
	e.seq++
	d := filepath.Join(e.work, fmt.Sprintf("%02d-%s", e.seq, name))
	_ = os.MkdirAll(d, 0o755)
	return d
}

// brokers lists the broker kinds to run against.
func (e *env) brokers() []string {
	var out []string
	for _, b := range e.cfg.brokers {
		if b != "mosquitto" || e.mosquitto != "" {
			out = append(out, b)
		}
	}
	return out
}

func findMosquitto(flagged string) string {
	if flagged != "" {
		return flagged
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

var netDialer net.Dialer

func freeAddr() (string, error) {
	p, err := proc.FreePort()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("127.0.0.1:%d", p), nil
}

// mosquittoConf is the benchmark's Mosquitto configuration: Debian's
// defaults, except that the controller's queue may hold the whole fleet's
// join. Mosquitto queues at most max_queued_messages (default 1000) QoS 1
// messages per client beyond those in flight and drops the rest: when
// thousands of devices connect at once, their hellos, states and presences
// for the controller's one subscription go over that, and the controller
// never learns of those devices until they reconnect.
const mosquittoConf = `listener %s 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
max_packet_size 1048576
max_queued_messages 200000
`

// startMosquitto runs a private Mosquitto (see mosquittoConf).
func (e *env) startMosquitto(ctx context.Context) (*proc.Process, string, error) {
	dir := e.dir("mosquitto")
	addr, err := freeAddr()
	if err != nil {
		return nil, "", err
	}
	_, port, _ := strings.Cut(addr, ":")
	conf := filepath.Join(dir, "mosquitto.conf")
	cfg := fmt.Sprintf(mosquittoConf, port)
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		return nil, "", err
	}
	p, err := proc.StartTied("mosquitto", filepath.Join(dir, "mosquitto.log"), e.mosquitto, "-c", conf)
	if err != nil {
		return nil, "", err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := (&netDialer).DialContext(ctx, "tcp", addr); err == nil {
			c.Close()
			return p, "tcp://" + addr, nil
		}
		if done, err := p.Exited(); done || time.Now().After(deadline) {
			p.Kill()
			return nil, "", fmt.Errorf("mosquitto did not listen on %s (%v); see %s", addr, err, p.Log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ctl is a running controller.
type ctl struct {
	p      *proc.Process
	dir    string
	api    string
	broker string
	token  string
	client *client.Client
}

// startController runs fleet-controller with a fresh data directory: its
// embedded broker when external is "", else against external. With
// profile, it is this binary running the same controller code under
// runtime/pprof (see profiledControllerCmd), writing its profiles to dir.
func (e *env) startController(ctx context.Context, external string, profile bool) (*ctl, error) {
	c := &ctl{dir: e.dir("controller")}
	httpAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	c.api = "http://" + httpAddr
	args := []string{"--data", filepath.Join(c.dir, "data"), "--http-listen", httpAddr, "--log-level", "warn"}
	if external == "" {
		mqttAddr, err := freeAddr()
		if err != nil {
			return nil, err
		}
		c.broker = "tcp://" + mqttAddr
		args = append(args, "--mqtt-listen", mqttAddr)
	} else {
		c.broker = external
		args = append(args, "--broker", external)
	}
	bin := filepath.Join(e.bin, "fleet-controller")
	if profile {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		bin = self
		args = append([]string{profiledControllerCmd, "--cpuprofile", filepath.Join(c.dir, "cpu.prof"),
			"--memprofile", filepath.Join(c.dir, "heap.prof"), "--"}, args...)
	}
	c.p, err = proc.StartTied("fleet-controller", filepath.Join(c.dir, "controller.log"), bin, args...)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := c.p.WaitHTTP(wctx, c.api+"/healthz"); err != nil {
		c.p.Kill()
		return nil, err
	}
	tok, err := os.ReadFile(filepath.Join(c.dir, "data", "admin.token"))
	if err == nil {
		c.token = strings.TrimSpace(string(tok))
	}
	if c.client, err = client.New(c.api, c.token); err != nil {
		c.p.Kill()
		return nil, err
	}
	return c, nil
}

// directorKey is the controller's director public key file, which every
// device pins so that it verifies each desired state, as in the field.
func (c *ctl) directorKey() string { return filepath.Join(c.dir, "data", "keys", "director.pub") }

func (c *ctl) stop() {
	if err := c.p.Stop(30 * time.Second); err != nil {
		slog.Default().Warn("controller stop", "err", err)
	}
}

// pushModels uploads bundles.
func (c *ctl) pushModels(ctx context.Context, bundles ...[]byte) error {
	for _, b := range bundles {
		if _, err := c.client.PushModel(ctx, b); err != nil {
			return err
		}
	}
	return nil
}

// call does one JSON API request with the admin token; out may be nil.
func (c *ctl) call(ctx context.Context, method, path string, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.api+path, body)
	if err != nil {
		return 0, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAPIResponse+1))
	if err != nil {
		return resp.StatusCode, err
	}
	if len(data) > maxAPIResponse {
		return resp.StatusCode, fmt.Errorf("%s %s: answer over %d bytes", method, path, maxAPIResponse)
	}
	if resp.StatusCode >= 300 {
		return resp.StatusCode, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

// maxAPIResponse caps what the benchmarks read from the controller.
const maxAPIResponse = 64 << 20

// metric reads one counter from the controller's /metrics.
func (c *ctl) metric(ctx context.Context, name string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.api+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	return parseMetric(io.LimitReader(resp.Body, 4<<20), name)
}

// parseMetric finds an unlabelled sample of name in the Prometheus text
// format.
func parseMetric(r io.Reader, name string) (float64, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(rest), 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("metric %s not found", name)
}

// simStatus mirrors one JSON line of `fleet sim -o json`.
type simStatus struct {
	UpSeconds float64 `json:"upSeconds"`
	sim.Stats
	Final bool `json:"final"`
}

// simProc is a running `fleet sim`, its reports read as they come.
type simProc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error

	mu   sync.Mutex
	last simStatus
	seen chan struct{}
}

// simLabels are the simulated devices' labels besides fleet=bench: two
// regions, twenty sites.
const simLabels = "region=eu:60,us:40;site=s1..s20"

// startSim runs `fleet sim` with n devices against c, reporting every
// 200 ms. The devices' data directories are the simulator's default: a
// temporary directory on tmpfs (/dev/shm), not the benchmark's working
// directory, which is on the machine's one disk with the controller's
// database: each device syncs its desired state, state.json and trust
// file a few times a rollout, tens of thousands of fsyncs a wave that the
// controller's own commits would queue behind, and no fleet shares one
// disk.
func (e *env) startSim(ctx context.Context, c *ctl, n int, extra ...string) (*simProc, error) {
	dir := e.dir("sim")
	args := append([]string{"sim", "--agents", fmt.Sprint(n), "--controller", c.api, "--broker", c.broker,
		"--labels", "fleet=bench;" + simLabels,
		"--every", "200ms", "-o", "json", "--log-level", "warn",
		"--release-key", e.releaseKey, "--director-key", c.directorKey()}, extra...)
	logf, err := os.Create(filepath.Join(dir, "sim.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(filepath.Join(e.bin, "fleet"), args...)
	cmd.Stderr = logf
	// Its own process group (a Ctrl-C reaches the benchmark, which stops it
	// cleanly), and killed if the benchmark dies first, like proc.StartTied.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	s := &simProc{cmd: cmd, log: logf.Name(), done: make(chan struct{}), seen: make(chan struct{}, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var st simStatus
			if json.Unmarshal(sc.Bytes(), &st) != nil {
				continue
			}
			s.mu.Lock()
			s.last = st
			s.mu.Unlock()
			select {
			case s.seen <- struct{}{}:
			default:
			}
		}
		io.Copy(io.Discard, out)
		s.err = cmd.Wait()
		logf.Close()
		close(s.done)
	}()
	return s, nil
}

func (s *simProc) pid() int { return s.cmd.Process.Pid }

func (s *simProc) status() simStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// wait waits until cond holds for a report, or timeout.
func (s *simProc) wait(ctx context.Context, timeout time.Duration, what string, cond func(simStatus) bool) (simStatus, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		st := s.status()
		if cond(st) {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-t.C:
			return st, fmt.Errorf("timed out after %s waiting for %s; last report %+v; see %s", timeout, what, st, s.log)
		case <-s.done:
			return st, fmt.Errorf("fleet sim exited (%v) while waiting for %s; see %s", s.err, what, s.log)
		case <-s.seen:
		}
	}
}

// interruptSignal stops `fleet sim` cleanly: each device says offline.
var interruptSignal = os.Interrupt

// stop interrupts the simulator (it stops its devices cleanly) and waits.
func (s *simProc) stop() {
	_ = s.cmd.Process.Signal(interruptSignal)
	select {
	case <-s.done:
	case <-time.After(60 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// memory reads a process's resident and peak resident memory in bytes.
func memory(pid int) (rss, peak int64, err error) {
	data, err := readSmall(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	return parseStatus(data)
}

func parseStatus(data []byte) (rss, peak int64, err error) {
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok || (key != "VmRSS" && key != "VmHWM") {
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return 0, 0, fmt.Errorf("/proc status line %q: want N kB", line)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc status line %q: %w", line, err)
		}
		if key == "VmRSS" {
			rss = n << 10
		} else {
			peak = n << 10
		}
	}
	if rss == 0 {
		return 0, 0, errors.New("/proc status has no VmRSS")
	}
	return rss, peak, nil
}

// clockTick is the unit of /proc/PID/stat times: USER_HZ, 100 on every
// Linux Go runs on.
const clockTick = 10 * time.Millisecond

// cpuTime reads the user plus system CPU time a process has used.
func cpuTime(pid int) (time.Duration, error) {
	data, err := readSmall(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStat(data)
}

func parseStat(data []byte) (time.Duration, error) {
	// The command name (field 2) may hold spaces; the fields after it are
	// plain. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("/proc stat: no command name")
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("/proc stat: too few fields")
	}
	var total int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc stat: %w", err)
		}
		total += n
	}
	return time.Duration(total) * clockTick, nil
}

// readSmall reads a /proc file, capped: they are a few KB.
func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 64<<10))
}
