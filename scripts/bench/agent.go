package main

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/models/bundle"
)

// agentResult is the agent's footprint.
type agentResult struct {
	BinaryBytes int64
	Static      bool
	// Idle is the resident memory of an idle agent serving one model, per
	// run, by model description.
	Idle []idleModel
}

type idleModel struct {
	Model      string // what was loaded, for the table
	ModuleSize int
	RSS        []int64
}

// idleSettle is how long an agent idles before its memory is read: long
// enough for start-up garbage to be collected.
const idleSettle = 10 * time.Second

// goGuestBundle is the Go-guest example `make models` builds: shown beside
// the compiled model for scale, when it is there.
const goGuestBundle = "models/examples/build/grid-anomaly-1.0.0.bundle"

func (e *env) benchAgent(ctx context.Context) (*agentResult, error) {
	path := filepath.Join(e.bin, "fleet-agent")
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	res := &agentResult{BinaryBytes: st.Size()}
	if res.Static, err = isStatic(path); err != nil {
		return nil, err
	}
	c, err := e.startController(ctx, "", false)
	if err != nil {
		return nil, err
	}
	defer c.stop()
	models := [][]byte{e.models[benchModel+"@1.0.0"]}
	if data, err := os.ReadFile(filepath.Join(e.cfg.root, goGuestBundle)); err == nil {
		models = append(models, data)
	}
	for _, data := range models {
		b, err := bundle.Decode(data)
		if err != nil {
			return nil, err
		}
		if err := c.pushModels(ctx, data); err != nil {
			return nil, err
		}
		im := idleModel{Model: fmt.Sprintf("%s %s", b.Manifest.Name, b.Manifest.Version), ModuleSize: len(b.Module)}
		for run := range e.cfg.runs {
			rss, err := e.idleAgent(ctx, c, b, run)
			if err != nil {
				return nil, err
			}
			im.RSS = append(im.RSS, rss)
			e.log.Info("idle agent", "model", im.Model, "run", run+1, "rss_mib", fmt.Sprintf("%.1f", mib(rss)))
		}
		res.Idle = append(res.Idle, im)
	}
	return res, nil
}

// idleAgent starts a fresh fleet-agent, has the controller assign it b,
// sends it a few inferences, lets it idle, and reads its resident memory.
func (e *env) idleAgent(ctx context.Context, c *ctl, b *bundle.Bundle, run int) (int64, error) {
	dir := e.dir("agent")
	listen, err := freeAddr()
	if err != nil {
		return 0, err
	}
	id := fmt.Sprintf("bench-idle-%s-%d", b.Manifest.Name, run)
	p, err := startChild(id, filepath.Join(dir, "agent.log"), filepath.Join(e.bin, "fleet-agent"),
		"--id", id, "--data", filepath.Join(dir, "data"), "--listen", listen, "--broker", c.broker,
		"--controller", c.api, "--label", "bench="+id, "--log-level", "warn")
	if err != nil {
		return 0, err
	}
	defer p.Stop(10 * time.Second)
	base := "http://" + listen
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := p.WaitHTTP(wctx, base+"/v2/health/live"); err != nil {
		return 0, err
	}
	// The assignment can only match once the controller has the hello.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ids, err := c.client.Assign(ctx, client.Assignment{Model: b.Manifest.Name, Version: b.Manifest.Version, Selector: "bench=" + id})
		if err == nil && len(ids) == 1 {
			break
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("assign %s to %s: %v (%d devices)", b.Manifest.Name, id, err, len(ids))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := p.WaitHTTP(wctx, base+"/v2/models/"+b.Manifest.Name+"/ready"); err != nil {
		return 0, err
	}
	body, err := inferRequest(&b.Manifest)
	if err != nil {
		return 0, err
	}
	for range 20 {
		resp, err := http.Post(base+"/v2/models/"+b.Manifest.Name+"/infer", "application/json", bytes.NewReader(body))
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("inference on the idle agent: %s", resp.Status)
		}
	}
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(idleSettle):
	}
	rss, _, err := memory(p.Pid())
	return rss, err
}

// inferRequest is an OIP request with the manifest's first golden input.
func inferRequest(m *bundle.Manifest) ([]byte, error) {
	if len(m.Tests) == 0 {
		return nil, fmt.Errorf("model %s has no golden test to take an input from", m.Name)
	}
	type tensor struct {
		Name     string    `json:"name"`
		Shape    []int64   `json:"shape"`
		Datatype string    `json:"datatype"`
		Data     []float64 `json:"data"`
	}
	var req struct {
		Inputs []tensor `json:"inputs"`
	}
	for _, in := range m.Tests[0].Inputs {
		req.Inputs = append(req.Inputs, tensor{Name: in.Name, Shape: in.Shape, Datatype: in.Datatype, Data: in.Data})
	}
	return json.Marshal(req)
}

// isStatic reports whether an ELF binary needs no dynamic loader.
func isStatic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return false, err
	}
	return len(libs) == 0, nil
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
