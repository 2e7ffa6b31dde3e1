// Command demo is what `make run` runs: a controller with its embedded
// broker, a few real agent processes with different labels, the example
// model pushed and assigned (first 1.0.0 everywhere, then 1.1.0 to the EU
// devices), inferences driven through each agent's local endpoint, and a
// live status table read from the controller's API. Ctrl-C stops it all.
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
	"strings"
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

var agents = []agentSpec{
	{"grid-berlin-01", []string{"region=eu", "hw=rpi5", "site=berlin", "sector=energy"}, "127.0.0.1:8181"},
	{"grid-lyon-01", []string{"region=eu", "hw=jetson", "site=lyon", "sector=energy"}, "127.0.0.1:8182"},
	{"grid-austin-01", []string{"region=us", "hw=jetson", "site=austin", "sector=energy"}, "127.0.0.1:8183"},
}

func main() {
	bin := flag.String("bin", "bin", "directory with fleet-controller and fleet-agent")
	models := flag.String("models", "models/examples/build", "directory with the example bundles")
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
	const httpAddr, mqttAddr = "127.0.0.1:8080", "127.0.0.1:1883"
	for _, a := range append([]string{httpAddr, mqttAddr}, agents[0].listen, agents[1].listen, agents[2].listen) {
		if err := proc.CheckFree(a); err != nil {
			return err
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
		step("starting fleet-agent %s (%v, local endpoint %s)", a.id, a.labels, a.listen)
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
		return fmt.Errorf("read the controller's admin token: %w (remove %s to start the demo afresh)", err, data)
	}
	step("using the admin API token from %s (fleet CLI: export EDGEFLEET_TOKEN=$(cat %s))", tokenFile, tokenFile)
	c, err := client.New("http://"+httpAddr, strings.TrimSpace(string(token)))
	if err != nil {
		return err
	}
	if err := waitFor(ctx, c, "all agents online", func(ds []client.Device) bool { return countOnline(ds) == len(agents) }); err != nil {
		return err
	}

	for _, v := range []string{"1.0.0", "1.1.0"} {
		src := filepath.Join(models, "grid-anomaly-"+v+".bundle")
		if _, err := os.Stat(src); err != nil {
			return fmt.Errorf("%w (run `make models` first)", err)
		}
		path := filepath.Join(data, "signed-grid-anomaly-"+v+".bundle")
		if err := fleet("model", "sign", "--key", filepath.Join(keys, "release.key"), "--out", path, src); err != nil {
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
		step("pushed %s@%s (sha256 %.12s, %d bytes)", m.Name, m.Version, m.Digest, m.Size)
	}

	var served, failed atomic.Int64

	phases := []struct {
		version, selector, why string
	}{
		{"1.0.0", "sector=energy", "every grid sensor"},
		{"1.1.0", "region=eu", "the EU sensors first"},
		{"1.1.0", "region=us", "then the US sensor"},
	}
	for i, ph := range phases {
		ids, err := c.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: ph.version, Selector: ph.selector})
		if err != nil {
			return err
		}
		step("assigned grid-anomaly@%s to %s (%s): %v", ph.version, ph.why, ph.selector, ids)
		want := map[string]bool{}
		for _, id := range ids {
			want[id] = true
		}
		err = waitFor(ctx, c, "", func(ds []client.Device) bool {
			show(ds, &served, &failed)
			for _, d := range ds {
				if want[d.ID] && d.Active("default").String() != "grid-anomaly@"+ph.version {
					return false
				}
			}
			return true
		})
		if err != nil {
			return err
		}
		step("grid-anomaly@%s active on %v", ph.version, ids)
		if i == 0 {
			step("sending sensor readings to each agent's local endpoint (POST /v2/models/grid-anomaly/infer)")
			go drive(ctx, &served, &failed)
		}
		// Let the inference counts at the controller move before the next phase.
		if err := sleep(ctx, 4*time.Second, c, &served, &failed); err != nil {
			return err
		}
	}
	step("all phases done; inferences keep flowing. Ctrl-C stops the fleet.")
	return sleep(ctx, 365*24*time.Hour, c, &served, &failed)
}

// fleet runs the fleet CLI in-process, as an operator would run it.
func fleet(args ...string) error {
	step("fleet %s", strings.Join(args, " "))
	var stderr bytes.Buffer
	if code := cli.Main(args, os.Stdout, &stderr); code != 0 {
		return fmt.Errorf("fleet %s: %s", strings.Join(args, " "), strings.TrimSpace(stderr.String()))
	}
	return nil
}

func step(format string, a ...any) {
	fmt.Printf("==> "+format+"\n", a...)
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
		case <-time.After(time.Second):
		}
	}
}

// sleep shows the status table every two seconds for d.
func sleep(ctx context.Context, d time.Duration, c *client.Client, served, failed *atomic.Int64) error {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if ds, err := c.Devices(ctx, ""); err == nil {
			show(ds, served, failed)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
	return nil
}

var lastShown time.Time

func show(ds []client.Device, served, failed *atomic.Int64) {
	if time.Since(lastShown) < 1900*time.Millisecond {
		return
	}
	lastShown = time.Now()
	fmt.Printf("\n%s  inferences sent by the demo: %d ok, %d failed\n", time.Now().Format("15:04:05"), served.Load(), failed.Load())
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
			resp, err := hc.Post("http://"+a.listen+"/v2/models/grid-anomaly/infer", "application/json", bytes.NewReader(body))
			if err != nil {
				failed.Add(1)
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
