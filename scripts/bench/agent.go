package main

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/scripts/internal/agentbuild"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// agentResult is the agent's footprint.
type agentResult struct {
	BinaryBytes int64
	Static      bool
	// BySize is where the binary's bytes go: symbol sizes by module.
	BySize []string
	// Idle is the resident memory of an idle agent serving one model, per
	// run, by model description.
	Idle []idleModel
}

type idleModel struct {
	Model      string // what was loaded, for the table
	ModuleSize int
	// Flags are the agent flags of these runs beyond the scenario's own
	// (none: the agent's defaults), for the table.
	Flags []string `json:",omitempty"`
	RSS   []int64
	// Anon and File split RSS, per run: anonymous memory (the Go heap and
	// stacks, wazero's compiled code, SQLite's cache) and file-backed
	// pages (the agent binary's code and data as far as it was touched).
	Anon, File []int64
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
	res.BySize = e.agentSizeByModule(ctx)
	c, err := e.startController(ctx, "", false)
	if err != nil {
		return nil, err
	}
	defer c.stop()
	models := [][]byte{e.models[benchModel+"@1.0.0"]}
	if data, err := os.ReadFile(filepath.Join(e.cfg.root, goGuestBundle)); err == nil {
		// Signed with the run's release key, as every bundle the
		// devices here take.
		b, err := bundle.Decode(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w; run make models", goGuestBundle, err)
		}
		if data, err = e.sign(b); err != nil {
			return nil, err
		}
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
		variants := [][]string{nil}
		if len(res.Idle) == 0 {
			// The compiled model also without the idle trim, to show what
			// it gives back (agent/internal/memtrim).
			variants = append(variants, []string{"--trim-after", "0"})
		}
		for _, flags := range variants {
			im := idleModel{Model: fmt.Sprintf("%s %s", b.Manifest.Name, b.Manifest.Version), ModuleSize: len(b.Module), Flags: flags}
			for run := range e.cfg.runs {
				rss, err := e.idleAgent(ctx, c, b, run, flags)
				if err != nil {
					return nil, err
				}
				im.RSS = append(im.RSS, rss.rss)
				im.Anon = append(im.Anon, rss.anon)
				im.File = append(im.File, rss.file)
				e.log.Info("idle agent", "model", im.Model, "flags", strings.Join(flags, " "), "run", run+1, "rss_mib", fmt.Sprintf("%.1f", mib(rss.rss)),
					"anon_mib", fmt.Sprintf("%.1f", mib(rss.anon)), "file_mib", fmt.Sprintf("%.1f", mib(rss.file)))
			}
			res.Idle = append(res.Idle, im)
		}
	}
	return res, nil
}

// setting says, for the table, how the agent of these runs was set.
func (im idleModel) setting() string {
	if len(im.Flags) > 0 {
		return "`" + strings.Join(im.Flags, " ") + "`"
	}
	return fmt.Sprintf("agent defaults: its idle trim gives memory back %s after the last inference", agent.DefaultTrimAfter)
}

// idleAgent starts a fresh fleet-agent (with flags added to the
// scenario's), has the controller assign it b, sends it a few inferences,
// lets it idle, and reads its resident memory.
func (e *env) idleAgent(ctx context.Context, c *ctl, b *bundle.Bundle, run int, flags []string) (m residentMemory, err error) {
	dir := e.dir("agent")
	listen, err := freeAddr()
	if err != nil {
		return m, err
	}
	id := fmt.Sprintf("bench-idle-%s-%d", b.Manifest.Name, run)
	if len(flags) > 0 {
		id = fmt.Sprintf("bench-idle-%s-v-%d", b.Manifest.Name, run)
	}
	args := append([]string{"--id", id, "--data", filepath.Join(dir, "data"), "--listen", listen, "--broker", c.broker,
		"--controller", c.api, "--label", "bench=" + id, "--log-level", "warn",
		"--release-key", e.releaseKey, "--director-key", c.directorKey()}, flags...)
	p, err := proc.StartTied(id, filepath.Join(dir, "agent.log"), filepath.Join(e.bin, "fleet-agent"), args...)
	if err != nil {
		return m, err
	}
	defer p.Stop(10 * time.Second)
	base := "http://" + listen
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := p.WaitHTTP(wctx, base+"/v2/health/live"); err != nil {
		return m, err
	}
	// The assignment can only match once the controller has the hello.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ids, err := c.client.Assign(ctx, client.Assignment{Model: b.Manifest.Name, Version: b.Manifest.Version, Selector: "bench=" + id})
		if err == nil && len(ids) == 1 {
			break
		}
		if time.Now().After(deadline) {
			return m, fmt.Errorf("assign %s to %s: %v (%d devices)", b.Manifest.Name, id, err, len(ids))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := p.WaitHTTP(wctx, base+"/v2/models/"+b.Manifest.Name+"/ready"); err != nil {
		return m, err
	}
	body, err := inferRequest(&b.Manifest)
	if err != nil {
		return m, err
	}
	for range 20 {
		resp, err := http.Post(base+"/v2/models/"+b.Manifest.Name+"/infer", "application/json", bytes.NewReader(body))
		if err != nil {
			return m, err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return m, fmt.Errorf("inference on the idle agent: %s", resp.Status)
		}
	}
	select {
	case <-ctx.Done():
		return m, ctx.Err()
	case <-time.After(idleSettle):
	}
	return readResident(p.Pid())
}

// residentMemory is a process's resident memory and its two kinds.
type residentMemory struct{ rss, anon, file int64 }

// readResident reads VmRSS, RssAnon and RssFile (plus RssShmem, counted
// as file) from /proc/PID/status.
func readResident(pid int) (residentMemory, error) {
	var m residentMemory
	data, err := readSmall(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		key, val, ok := strings.Cut(line, ":")
		f := strings.Fields(val)
		if !ok || len(f) != 2 || f[1] != "kB" {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return m, fmt.Errorf("/proc status line %q: %w", line, err)
		}
		switch key {
		case "VmRSS":
			m.rss = n << 10
		case "RssAnon":
			m.anon = n << 10
		case "RssFile", "RssShmem":
			m.file += n << 10
		}
	}
	if m.rss == 0 {
		return m, errors.New("/proc status has no VmRSS")
	}
	return m, nil
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

// agentSizeByModule builds fleet-agent as shipped but with its symbol
// table (agentbuild.Options.Symbols), and sums the sizes of the symbols
// that take room in the file (not the zeroed data, which takes none) by
// module, the largest first. Symbols are most
// of the stripped file; the rest is the runtime's tables, which shrink
// with the code.
func (e *env) agentSizeByModule(ctx context.Context) []string {
	out := filepath.Join(e.work, "fleet-agent.symbols")
	cmd := agentbuild.Command(ctx, e.cfg.root, out, agentbuild.Options{Symbols: true})
	if b, err := cmd.CombinedOutput(); err != nil {
		return []string{fmt.Sprintf("(go build: %v: %s)", err, b)}
	}
	syms, err := fileSymbols(out)
	if err != nil {
		return []string{fmt.Sprintf("(symbols of %s: %v)", out, err)}
	}
	return sizeByModule(syms, 12)
}

// symbol is a name and the bytes it takes in the file.
type symbol struct {
	name string
	size int64
}

// fileSymbols returns an ELF file's symbols that occupy bytes in it.
func fileSymbols(path string) ([]symbol, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	all, err := f.Symbols()
	if err != nil {
		return nil, err
	}
	var out []symbol
	for _, s := range all {
		i := int(s.Section)
		if s.Size == 0 || i <= 0 || i >= len(f.Sections) || f.Sections[i].Type == elf.SHT_NOBITS {
			continue
		}
		out = append(out, symbol{s.Name, int64(s.Size)})
	}
	return out, nil
}

// sizeByModule sums symbol sizes by module and returns the top n as
// "module  KiB  share" lines.
func sizeByModule(syms []symbol, n int) []string {
	sums := map[string]int64{}
	var total int64
	for _, s := range syms {
		total += s.size
		sums[moduleOf(s.name)] += s.size
	}
	type kv struct {
		k string
		v int64
	}
	var all []kv
	for k, v := range sums {
		all = append(all, kv{k, v})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v || all[i].v == all[j].v && all[i].k < all[j].k })
	var lines []string
	for i, x := range all {
		if i == n {
			break
		}
		lines = append(lines, fmt.Sprintf("%-45s %8.0f KiB  %4.1f%%", x.k, float64(x.v)/1024, 100*float64(x.v)/float64(total)))
	}
	return lines
}

// moduleOf names what a symbol belongs to: its module for a third-party
// or Edgefleet package, its package for the standard library.
func moduleOf(sym string) string {
	// The package path ends at the first '.' after the last '/' before
	// any '(' or '[' of a method or generic instance.
	path := sym
	if i := strings.IndexAny(path, "(["); i >= 0 {
		path = path[:i]
	}
	slash := strings.LastIndexByte(path, '/')
	if dot := strings.IndexByte(path[slash+1:], '.'); dot >= 0 {
		path = path[:slash+1+dot]
	}
	parts := strings.Split(strings.ReplaceAll(path, "%2e", "."), "/")
	switch {
	case len(parts) >= 3 && strings.Contains(parts[0], "."):
		if parts[0] == "github.com" && parts[1] == "edgefleet" && len(parts) >= 4 {
			return strings.Join(parts[:4], "/")
		}
		if parts[0] == "github.com" || parts[0] == "golang.org" {
			return strings.Join(parts[:3], "/")
		}
		return strings.Join(parts[:2], "/")
	case len(parts) == 2 && strings.Contains(parts[0], "."):
		return strings.Join(parts, "/")
	case path == "" || strings.HasPrefix(sym, "go:") || strings.HasPrefix(sym, "type:"):
		return "(runtime tables, types)"
	}
	return "std: " + parts[0]
}
