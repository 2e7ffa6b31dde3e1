// Command demo is what `make run` runs: a controller with its embedded
// broker and six real agent processes over two regions; the example models
// signed with a release key and pushed; grid-anomaly 1.0.0 installed on
// every device; sensor readings driven through each agent's local endpoint;
// then a staged rollout of grid-anomaly 1.1.0 in three waves, stratified by
// region, each wave soaking and gated on the inference error rate, shown
// wave by wave as the controller streams it (server-sent events), with the
// inference counters. Then it keeps the fleet running, with a status table,
// until Ctrl-C.
//
// Each run starts from an empty fleet (the controller's and agents' state of
// the previous run is removed); the logs and state of the run stay under
// the data directory afterwards.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/cli"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

type agentSpec struct {
	id     string
	labels []string
	listen string
}

// agents are the demo's devices: grid sensors at six sites, three in each
// region.
var agents = []agentSpec{
	{"grid-berlin-01", []string{"region=eu", "hw=rpi5", "site=berlin", "sector=energy"}, "127.0.0.1:8181"},
	{"grid-lyon-01", []string{"region=eu", "hw=jetson", "site=lyon", "sector=energy"}, "127.0.0.1:8182"},
	{"grid-madrid-01", []string{"region=eu", "hw=rpi5", "site=madrid", "sector=energy"}, "127.0.0.1:8183"},
	{"grid-austin-01", []string{"region=us", "hw=jetson", "site=austin", "sector=energy"}, "127.0.0.1:8184"},
	{"grid-denver-01", []string{"region=us", "hw=rpi5", "site=denver", "sector=energy"}, "127.0.0.1:8185"},
	{"grid-boston-01", []string{"region=us", "hw=jetson", "site=boston", "sector=energy"}, "127.0.0.1:8186"},
}

const (
	httpAddr, mqttAddr = "127.0.0.1:8080", "127.0.0.1:1883"
	model              = "grid-anomaly"
	fromVersion        = "1.0.0"
	toVersion          = "1.1.0"
	fleetSelector      = "sector=energy"
)

// rolloutSpec is the staged rollout the demo runs: one device first, then
// half the fleet, then the rest, each wave taking devices from both
// regions; every device soaks 5 s on the new version, and a wave passes
// only if at most 2 % of its inferences failed.
func rolloutSpec(name string) client.RolloutSpec {
	return client.RolloutSpec{
		Name: name, Selector: fleetSelector, Model: model + "@" + toVersion,
		Strategy: client.RolloutStrategy{
			Waves:         []client.WaveSpec{{Size: "1"}, {Size: "50%"}, {Size: "100%"}},
			StratifyBy:    "region",
			Soak:          "5s",
			Gates:         []client.GateSpec{{Type: "errorRate", Max: 0.02, MinInferences: 20}},
			FailureBudget: "1",
			Health:        &client.HealthSpec{MaxErrorRate: 0.05, MinInferences: 5},
		},
	}
}

func main() {
	bin := flag.String("bin", "bin", "directory with fleet-controller and fleet-agent")
	models := flag.String("models", "models/examples/build", "directory with the example bundles (make models)")
	data := flag.String("data", "data", "directory for all state and logs")
	duration := flag.Duration("duration", 0, "stop after this long (0 = until Ctrl-C)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	if err := run(ctx, *bin, *models, *data); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, bin, models, data string) error {
	addrs := []string{httpAddr, mqttAddr}
	for _, a := range agents {
		addrs = append(addrs, a.listen)
	}
	for _, a := range addrs {
		if err := proc.CheckFree(a); err != nil {
			return fmt.Errorf("%w (is another `make run` or fleet-controller running?)", err)
		}
	}
	// A fresh fleet each run: an agent keeps a version floor, so the
	// previous run's 1.1.0 would refuse this run's 1.0.0 install.
	for _, d := range []string{"controller", "agents", "logs"} {
		if err := os.RemoveAll(filepath.Join(data, d)); err != nil {
			return fmt.Errorf("clear the previous run's state: %w", err)
		}
	}
	logs := filepath.Join(data, "logs")
	var procs []*proc.Process
	defer func() {
		fmt.Println("\nstopping agents and controller...")
		for i := len(procs) - 1; i >= 0; i-- {
			if err := procs[i].Stop(10 * time.Second); err != nil {
				fmt.Fprintln(os.Stderr, err)
			}
		}
		fmt.Printf("stopped. State is kept under %s, logs under %s\n", data, logs)
	}()

	step("starting fleet-controller (embedded MQTT broker on %s, API on %s)", mqttAddr, httpAddr)
	ctrl, err := proc.Start("fleet-controller", filepath.Join(logs, "controller.log"), filepath.Join(bin, "fleet-controller"),
		"--data", filepath.Join(data, "controller"), "--http-listen", httpAddr, "--mqtt-listen", mqttAddr)
	if err != nil {
		return err
	}
	procs = append(procs, ctrl)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := ctrl.WaitHTTP(wctx, "http://"+httpAddr+"/healthz"); err != nil {
		return err
	}

	// Trust: a release key made as an operator would (`fleet keys init`),
	// and the director key the controller made on its first start; the
	// agents trust both and nothing else.
	keys := filepath.Join(data, "keys")
	if _, err := os.Stat(filepath.Join(keys, "release.key")); errors.Is(err, os.ErrNotExist) {
		if err := fleet("keys", "init", "--dir", keys); err != nil {
			return err
		}
	}
	releasePub, directorPub := filepath.Join(keys, "release.pub"), filepath.Join(data, "controller", "keys", "director.pub")
	for _, a := range agents {
		args := []string{"--id", a.id, "--data", filepath.Join(data, "agents", a.id), "--listen", a.listen,
			"--broker", "tcp://" + mqttAddr, "--controller", "http://" + httpAddr,
			"--release-key", releasePub, "--director-key", directorPub}
		for _, l := range a.labels {
			args = append(args, "--label", l)
		}
		step("starting fleet-agent %s (%s, local endpoint %s)", a.id, strings.Join(a.labels, ","), a.listen)
		p, err := proc.Start(a.id, filepath.Join(logs, a.id+".log"), filepath.Join(bin, "fleet-agent"), args...)
		if err != nil {
			return err
		}
		procs = append(procs, p)
	}
	for i, a := range agents {
		if err := procs[i+1].WaitHTTP(wctx, "http://"+a.listen+"/v2/health/live"); err != nil {
			return err
		}
	}

	// The controller wrote its first admin token on first start; the demo
	// is that operator.
	tokenFile := filepath.Join(data, "controller", "admin.token")
	token, err := os.ReadFile(tokenFile)
	if err != nil {
		return fmt.Errorf("read the controller's admin token: %w", err)
	}
	step("using the admin API token from %s (fleet CLI: export EDGEFLEET_TOKEN=$(cat %s))", tokenFile, tokenFile)
	c, err := client.New("http://"+httpAddr, strings.TrimSpace(string(token)))
	if err != nil {
		return err
	}
	if err := waitFor(ctx, c, "all six agents online", func(ds []client.Device) bool { return countOnline(ds) == len(agents) }); err != nil {
		return err
	}

	if err := pushExamples(ctx, c, models, data, filepath.Join(keys, "release.key")); err != nil {
		return err
	}

	ids, err := c.Assign(ctx, client.Assignment{Model: model, Version: fromVersion, Selector: fleetSelector})
	if err != nil {
		return err
	}
	step("installing %s@%s on every grid sensor (%s): %d devices", model, fromVersion, fleetSelector, len(ids))
	err = waitFor(ctx, c, "", func(ds []client.Device) bool {
		return countOn(ds, fromVersion) == len(ids)
	})
	if err != nil {
		return err
	}
	var served, failed atomic.Int64
	step("%s@%s active everywhere; sending sensor readings to each agent (POST /v2/models/%s/infer, 20 a second each)", model, fromVersion, model)
	go drive(ctx, &served, &failed)
	if err := status(ctx, c, 3*time.Second, 3*time.Second, &served, &failed); err != nil {
		return err
	}

	name := "grid-" + strings.ReplaceAll(toVersion, ".", "-") + "-" + time.Now().Format("150405")
	spec := rolloutSpec(name)
	r, err := c.CreateRollout(ctx, spec)
	if err != nil {
		return fmt.Errorf("create the rollout: %w", err)
	}
	step("rollout %s: %s to %s in waves of 1, 50%%, 100%% (stratified by region), soak %s per device, gate: error rate <= 2%%",
		r.ID, spec.Model, spec.Selector, spec.Strategy.Soak)
	step("following it live (GET /v1/rollouts/%s/events; `fleet rollout watch %s` shows the same)", r.ID, r.ID)
	start := time.Now()
	final, err := follow(ctx, c, r.ID, &served, &failed)
	if err != nil {
		return err
	}
	if final.Phase != "succeeded" {
		step("rollout %s ended %s after %s: %s", final.ID, strings.ToUpper(final.Phase), time.Since(start).Round(time.Second), final.Reason)
	} else {
		step("rollout %s SUCCEEDED in %s: %s@%s on every grid sensor, each healthy through its soak",
			final.ID, time.Since(start).Round(time.Second), model, toVersion)
	}
	showDevices(ctx, c, &served, &failed)
	step("the fleet keeps running, inferences keep flowing; try in another shell:")
	fmt.Printf("      export EDGEFLEET_TOKEN=$(cat %s)\n", tokenFile)
	fmt.Printf("      bin/fleet devices; bin/fleet rollout get %s; bin/fleet audit\n", final.ID)
	fmt.Printf("      curl -s localhost:8181/v2/models/%s/infer -d '{\"inputs\":[{\"name\":\"readings\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[231,10,50,35]}]}'\n", model)
	step("Ctrl-C stops the fleet.")
	return status(ctx, c, 365*24*time.Hour, 10*time.Second, &served, &failed)
}

// pushExamples signs every example bundle with the release key, as an
// operator would (`fleet model sign`), and pushes it to the controller.
func pushExamples(ctx context.Context, c *client.Client, models, data, releaseKey string) error {
	bundles, err := filepath.Glob(filepath.Join(models, "*.bundle"))
	if err != nil {
		return err
	}
	for _, v := range []string{fromVersion, toVersion} {
		if _, err := os.Stat(filepath.Join(models, model+"-"+v+".bundle")); err != nil {
			return fmt.Errorf("%w (run `make models` first)", err)
		}
	}
	signed := filepath.Join(data, "signed")
	if err := os.MkdirAll(signed, 0o755); err != nil {
		return err
	}
	step("signing the example bundles of %s with the release key (fleet model sign) and pushing them", models)
	var pushed []string
	for _, src := range bundles {
		path := filepath.Join(signed, filepath.Base(src))
		if err := fleetQuiet("model", "sign", "--key", releaseKey, "--out", path, src); err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		m, err := c.PushModel(ctx, b)
		if err != nil {
			return fmt.Errorf("push %s: %w", path, err)
		}
		pushed = append(pushed, fmt.Sprintf("%s@%s (%d bytes)", m.Name, m.Version, m.Size))
	}
	step("pushed %d signed bundles: %s", len(pushed), strings.Join(pushed, ", "))
	return nil
}

// follow shows the rollout each time the controller streams a change of
// it, and the inference counters every few seconds in between, until the
// rollout finishes.
func follow(ctx context.Context, c *client.Client, id string, served, failed *atomic.Int64) (*client.Rollout, error) {
	var mu sync.Mutex // one picture at a time
	var last string
	var final *client.Rollout
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(4 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			ds, err := c.Devices(wctx, fleetSelector)
			if err != nil {
				continue
			}
			mu.Lock()
			fmt.Printf("%s  %s\n", clock(), counters(ds, served, failed))
			mu.Unlock()
		}
	}()
	lastStage := ""
	err := c.WatchRollout(ctx, id, func(r *client.Rollout) error {
		mu.Lock()
		defer mu.Unlock()
		key := progressKey(r)
		if key == last {
			return nil
		}
		last = key
		// The whole picture when a wave starts or the rollout's phase
		// changes; one line for the wave in progress in between.
		if stage := fmt.Sprintf("%s|%d", r.Phase, r.Wave); stage != lastStage || r.Wave >= len(r.Waves) {
			lastStage = stage
			var buf bytes.Buffer
			tw := tabwriter.NewWriter(&buf, 0, 4, 2, ' ', 0)
			cli.RenderRollout(tw, r, time.Now())
			tw.Flush()
			fmt.Printf("\n%s  %s\n", clock(), indent(buf.String()))
		} else {
			fmt.Printf("%s  %s\n", clock(), waveLine(r.Waves[r.Wave]))
		}
		if r.Finished() {
			final = r
			return client.ErrStopWatching
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return final, nil
}

// waveLine is one wave's progress in a line: its state, the devices at
// each step, and its gates' verdicts so far.
func waveLine(w client.RolloutWave) string {
	done := w.Steps["healthy"] + w.Steps["failed"] + w.Steps["timed-out"] + w.Steps["skipped"] + w.Steps["rolled-back"]
	line := fmt.Sprintf("wave %d %s, %d/%d done:", w.Index+1, w.State, done, w.Size)
	for _, s := range []string{"pending", "notified", "downloading", "verified", "activated", "healthy", "failed", "timed-out", "skipped", "rolling-back", "rolled-back"} {
		if n := w.Steps[s]; n > 0 {
			line += fmt.Sprintf(" %s %d", s, n)
		}
	}
	for _, g := range w.Gates {
		line += fmt.Sprintf("; gate %s %s (%s)", g.Gate, strings.ToUpper(g.Result), g.Detail)
	}
	return line
}

// progressKey is what of a rollout the demo redraws on: phase, wave, each
// wave's state, device steps and gate verdicts (not timestamps).
func progressKey(r *client.Rollout) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s|%d|%s|", r.Phase, r.Wave, r.Reason)
	for _, w := range r.Waves {
		fmt.Fprintf(&b, "%s:%s:", w.State, steps(w.Steps))
		for _, g := range w.Gates {
			fmt.Fprintf(&b, "%s=%s,", g.Gate, g.Result)
		}
		b.WriteByte('|')
	}
	return b.String()
}

func steps(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	return strings.Join(parts, ",")
}

// counters is one line: inferences the demo sent and the controller
// received, and how many devices run each version.
func counters(ds []client.Device, served, failed *atomic.Int64) string {
	var inf, errs uint64
	versions := map[string]int{}
	for _, d := range ds {
		inf += d.Inferences
		errs += d.InferenceErrors
		versions[d.Active("default").String()]++
	}
	var on []string
	for _, v := range []string{model + "@" + fromVersion, model + "@" + toVersion} {
		on = append(on, fmt.Sprintf("%s on %d", v, versions[v]))
	}
	return fmt.Sprintf("inferences: sent %d ok, %d failed; controller received %d (%d errors); %s",
		served.Load(), failed.Load(), inf, errs, strings.Join(on, ", "))
}

// fleet runs the fleet CLI in-process, as an operator would run it.
func fleet(args ...string) error {
	step("fleet %s", strings.Join(args, " "))
	return fleetQuiet(args...)
}

// fleetQuiet is fleet without echoing the command or its output.
func fleetQuiet(args ...string) error {
	var stdout, stderr bytes.Buffer
	if code := cli.Main(args, &stdout, &stderr); code != 0 {
		return fmt.Errorf("fleet %s: %s", strings.Join(args, " "), strings.TrimSpace(stderr.String()))
	}
	return nil
}

func step(format string, a ...any) {
	fmt.Printf(clock()+" ==> "+format+"\n", a...)
}

func clock() string { return time.Now().Format("15:04:05") }

func indent(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n          ")
}

func countOnline(ds []client.Device) int {
	n := 0
	for _, d := range ds {
		if d.Online {
			n++
		}
	}
	return n
}

func countOn(ds []client.Device, version string) int {
	n := 0
	for _, d := range ds {
		if d.Active("default").String() == model+"@"+version {
			n++
		}
	}
	return n
}

// waitFor polls the device list until ok says so.
func waitFor(ctx context.Context, c *client.Client, what string, ok func([]client.Device) bool) error {
	if what != "" {
		step("waiting for %s", what)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ds, err := c.Devices(ctx, "")
		if err == nil && ok(ds) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gave up waiting after 2m (last error: %v); see the logs under data/logs", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// status shows the device table every period, for d.
func status(ctx context.Context, c *client.Client, d, period time.Duration, served, failed *atomic.Int64) error {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(period):
		}
		showDevices(ctx, c, served, failed)
	}
	return nil
}

func showDevices(ctx context.Context, c *client.Client, served, failed *atomic.Int64) {
	ds, err := c.Devices(ctx, "")
	if err != nil {
		return
	}
	fmt.Printf("\n%s  %s\n", clock(), counters(ds, served, failed))
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	cli.DevicesTable(tw, ds, time.Now())
	tw.Flush()
}

// drive sends sensor readings to every agent's local endpoint, as the
// apps on the devices would.
func drive(ctx context.Context, served, failed *atomic.Int64) {
	hc := &http.Client{Timeout: 5 * time.Second}
	rng := rand.New(rand.NewPCG(1, 2))
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, a := range agents {
			v := []float32{230 + float32(rng.NormFloat64()*3), 10 + float32(rng.NormFloat64()), 50 + float32(rng.NormFloat64()*0.05), 35 + float32(rng.NormFloat64()*4)}
			if rng.IntN(20) == 0 {
				v[0] += 40 // a voltage swell now and then
			}
			body, _ := json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "readings", "shape": []int{1, 4}, "datatype": "FP32", "data": v}}})
			resp, err := hc.Post("http://"+a.listen+"/v2/models/"+model+"/infer", "application/json", bytes.NewReader(body))
			if err != nil {
				if ctx.Err() == nil {
					failed.Add(1)
				}
				continue
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				served.Add(1)
			} else {
				failed.Add(1)
			}
		}
	}
}
