package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
	"gopkg.in/yaml.v3"
)

const rolloutUsage = "create|list|get|watch|pause|resume|approve|abort|rollback ..."

// MaxSpecFile caps a rollout.yaml file.
const MaxSpecFile = 64 << 10

func rolloutHelp(w io.Writer) {
	fmt.Fprint(w, `usage:
  fleet rollout create -f rollout.yaml [--dry-run] [--watch]
  fleet rollout create MODEL@VERSION -l SELECTOR [--name N] [--slot S] [--waves 1%,10%,50%,100%]
  fleet rollout create --agent-release VERSION -l SELECTOR [the same flags but --slot]
        [--soak 10m] [--stratify-by LABEL] [--failure-budget 2%] [--max-concurrent-downloads N]
        [--deadline 30m] [--unreachable fail|skip|wait] [--on-failure rollback|stop]
        [--approve-before 3,4] [--max-error-rate 0.02] [--max-latency-ratio 1.5]
        [--gate 'shadowAgreement>=0.98 over 200'] [--dry-run] [--watch]
  fleet rollout list
  fleet rollout get ID [--devices [--step STEP] [--wave N]]
  fleet rollout watch ID
  fleet rollout pause|resume|approve|abort|rollback ID [--watch]

watch shows each wave's progress, the devices at every step and the gates' verdicts, live,
and exits when the rollout finishes: 0 if it succeeded, 1 if it was aborted or rolled back.
`)
}

func runRollout(ctx context.Context, e *exec, args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		rolloutHelp(e.stderr)
		if len(args) == 0 {
			return usageErr("want a subcommand: %s", rolloutUsage)
		}
		return flag.ErrHelp
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create":
		return rolloutCreate(ctx, e, args)
	case "list":
		return rolloutList(ctx, e, args)
	case "get":
		return rolloutGet(ctx, e, args)
	case "watch":
		return rolloutWatchCmd(ctx, e, args)
	case "pause", "resume", "approve", "abort", "rollback":
		return rolloutAction(ctx, e, sub, args)
	}
	return usageErr("unknown rollout subcommand %q: want %s", sub, rolloutUsage)
}

// specFromFile reads rollout.yaml (or .json) and returns it as JSON, the
// form the API takes. The controller checks it field by field.
func specFromFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSpecFile+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > MaxSpecFile {
		return nil, fmt.Errorf("%s is over %d bytes; a rollout specification is a few hundred", path, MaxSpecFile)
	}
	out, err := SpecYAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// SpecYAMLToJSON converts a rollout specification written in YAML (JSON is
// YAML too) to JSON. It refuses more than one document and anything that
// is not a mapping at the top.
func SpecYAMLToJSON(data []byte) ([]byte, error) {
	if len(data) > MaxSpecFile {
		return nil, fmt.Errorf("specification is over %d bytes", MaxSpecFile)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc any
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("the file is empty; write selector, model and strategy")
		}
		return nil, fmt.Errorf("not valid YAML: %w", err)
	}
	var more any
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return nil, errors.New("more than one YAML document; keep one rollout per file")
	}
	m, ok := doc.(map[string]any)
	if !ok {
		return nil, errors.New("the top level must be a mapping (selector: ..., model: ..., strategy: ...)")
	}
	clean, err := jsonable(m)
	if err != nil {
		return nil, err
	}
	return json.Marshal(clean)
}

// jsonable turns what yaml.v3 decodes into what encoding/json encodes:
// mappings with non-string keys are refused.
func jsonable(v any) (any, error) {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, v := range x {
			c, err := jsonable(v)
			if err != nil {
				return nil, err
			}
			out[k] = c
		}
		return out, nil
	case map[any]any:
		return nil, errors.New("a mapping has a key that is not text")
	case []any:
		out := make([]any, len(x))
		for i, v := range x {
			c, err := jsonable(v)
			if err != nil {
				return nil, err
			}
			out[i] = c
		}
		return out, nil
	case time.Time:
		return x.Format(time.RFC3339), nil
	}
	return v, nil
}

// specFromFlags builds the specification of the simple case.
func specFromFlags(model, sel, name, slot, waves, soak, stratify, budget string, maxDownloads int, deadline, unreachable, onFailure, approve string, maxErr, maxLat float64) ([]byte, error) {
	spec := client.RolloutSpec{Name: name, Selector: sel, Model: model, Slot: slot}
	st := &spec.Strategy
	st.Soak, st.StratifyBy, st.FailureBudget = soak, stratify, budget
	st.MaxConcurrentDownloads, st.Deadline, st.Unreachable, st.OnFailure = maxDownloads, deadline, unreachable, onFailure
	needApproval := map[int]bool{}
	if approve != "" {
		for _, s := range strings.Split(approve, ",") {
			var n int
			if _, err := fmt.Sscanf(strings.TrimSpace(s), "%d", &n); err != nil || n < 1 {
				return nil, usageErr("--approve-before %q: give wave numbers counted from 1, e.g. 3,4", approve)
			}
			needApproval[n] = true
		}
	}
	for i, w := range strings.Split(waves, ",") {
		w = strings.TrimSpace(w)
		if w == "" {
			return nil, usageErr("--waves %q: give sizes separated by commas, e.g. 1%%,10%%,50%%,100%%", waves)
		}
		st.Waves = append(st.Waves, client.WaveSpec{Size: w, Approval: needApproval[i+1]})
	}
	for n := range needApproval {
		if n > len(st.Waves) {
			return nil, usageErr("--approve-before %d: there are only %d waves", n, len(st.Waves))
		}
	}
	if maxErr > 0 {
		st.Gates = append(st.Gates, client.GateSpec{Type: "errorRate", Max: maxErr})
	}
	if maxLat > 0 {
		st.Gates = append(st.Gates, client.GateSpec{Type: "latency", MaxP95Ratio: maxLat, MaxP99Ratio: maxLat})
	}
	return json.Marshal(spec)
}

func rolloutCreate(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "rollout create", &g)
	file := fs.String("f", "", "rollout specification file (YAML or JSON)")
	sel := fs.String("l", "", "label selector of the target devices, e.g. 'region=eu,hw in (jetson,rpi5),!lab'")
	name := fs.String("name", "", "rollout name (default: generated)")
	slot := fs.String("slot", "", "model slot (default: default)")
	waves := fs.String("waves", "1%,10%,50%,100%", "cumulative wave sizes, counts or percentages")
	soak := fs.String("soak", "", "how long each device must stay healthy before it counts (default 5m)")
	stratify := fs.String("stratify-by", "", "label whose every value each wave covers in proportion")
	budget := fs.String("failure-budget", "", "failures allowed before the rollout stops: a count or a percentage (default 0)")
	maxDownloads := fs.Int("max-concurrent-downloads", 0, "devices of a wave downloading at once (0: no cap)")
	deadline := fs.String("deadline", "", "how long a device may stay in one step (default 30m)")
	unreachable := fs.String("unreachable", "", "what an offline device past its deadline counts as: fail, skip or wait (default fail)")
	onFailure := fs.String("on-failure", "", "rollback (default) or stop when the rollout fails")
	approve := fs.String("approve-before", "", "waves (counted from 1) that wait for fleet rollout approve, e.g. 3,4")
	maxErr := fs.Float64("max-error-rate", 0, "error rate gate: the highest share of failed inferences, e.g. 0.02")
	maxLat := fs.Float64("max-latency-ratio", 0, "latency gate: the highest p95/p99 ratio to the previous version, e.g. 1.5")
	var gates gateFlags
	fs.Var(&gates, "gate", gateHelp)
	agentRel := fs.String("agent-release", "", "roll out this agent release version (fleet agent release push) instead of a model")
	dry := fs.Bool("dry-run", false, "show the waves it would have, create nothing")
	watch := fs.Bool("watch", false, "watch the rollout once created")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	var spec []byte
	switch {
	case *file != "":
		if len(pos) > 0 || *sel != "" {
			return usageErr("give either -f FILE or MODEL@VERSION -l SELECTOR, not both")
		}
		if spec, err = specFromFile(*file); err != nil {
			return err
		}
	case *agentRel != "":
		if len(pos) > 0 || *slot != "" {
			return usageErr("--agent-release rolls out an agent release: give no MODEL@VERSION and no --slot")
		}
		if *sel == "" {
			return usageErr("no selector: pass -l SELECTOR (-l '' targets every device)")
		}
		spec, err = specFromFlags("", *sel, *name, "", *waves, *soak, *stratify, *budget, *maxDownloads,
			*deadline, *unreachable, *onFailure, *approve, *maxErr, *maxLat)
		if err == nil {
			spec, err = withAgent(spec, *agentRel)
		}
		if err != nil {
			return err
		}
	default:
		if len(pos) != 1 {
			return usageErr("want -f rollout.yaml, or MODEL@VERSION -l SELECTOR")
		}
		if n, v, ok := strings.Cut(pos[0], "@"); !ok || n == "" || v == "" {
			return usageErr("%q: write the model as NAME@VERSION, e.g. grid-anomaly@1.1.0", pos[0])
		}
		if *sel == "" {
			return usageErr("no selector: pass -l SELECTOR (-l '' targets every device)")
		}
		spec, err = specFromFlags(pos[0], *sel, *name, *slot, *waves, *soak, *stratify, *budget, *maxDownloads,
			*deadline, *unreachable, *onFailure, *approve, *maxErr, *maxLat)
		if err != nil {
			return err
		}
	}
	if len(gates) > 0 {
		if *file != "" {
			return usageErr("--gate goes with MODEL@VERSION -l SELECTOR; in a file, write the gates under strategy.gates")
		}
		if spec, err = withGates(spec, gates); err != nil {
			return err
		}
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	if *dry {
		p, err := c.PlanRolloutJSON(ctx, spec)
		if err != nil {
			return err
		}
		return emit(e.stdout, g.output, p, func(tw *tabwriter.Writer) {
			fmt.Fprintf(tw, "rollout %s would update %d devices in %d waves (failure budget %d):\n", p.ID, p.Targets, len(p.Waves), p.FailureBudget)
			fmt.Fprintln(tw, "WAVE\tDEVICES\tSTRATA\tFIRST DEVICES")
			for _, w := range p.Waves {
				first := w.Devices[:min(5, len(w.Devices))]
				more := ""
				if len(w.Devices) > len(first) {
					more = ", ..."
				}
				fmt.Fprintf(tw, "%d\t%d\t%s\t%s%s\n", w.Index+1, len(w.Devices), formatCounts(w.Strata), strings.Join(first, ", "), more)
			}
		})
	}
	r, err := c.CreateRolloutJSON(ctx, spec)
	if err != nil {
		return err
	}
	if *watch {
		return watchRollout(ctx, e, c, g.output, r.ID)
	}
	return emit(e.stdout, g.output, r, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "rollout %s created: %s@%s into slot %s on %d devices in %d waves; follow it with: fleet rollout watch %s\n",
			r.ID, r.Model, r.Version, r.Slot, r.Targets, len(r.Waves), r.ID)
	})
}

func formatCounts(m map[string]int) string {
	if len(m) == 0 {
		return "-"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		name := k
		if name == "" {
			name = "(none)"
		}
		parts[i] = fmt.Sprintf("%s=%d", name, m[k])
	}
	return strings.Join(parts, " ")
}

func rolloutList(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "rollout list", &g)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("rollout list takes no arguments")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	rs, err := c.Rollouts(ctx)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, map[string]any{"rollouts": rs}, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "ROLLOUT\tMODEL\tSLOT\tPHASE\tWAVE\tHEALTHY\tFAILED\tCREATED\tSELECTOR")
		for _, r := range rs {
			fmt.Fprintf(tw, "%s\t%s@%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%s\t%s\n", r.ID, r.Model, r.Version, r.Slot, r.Phase,
				waveLabel(&r), r.Steps["healthy"], r.Targets, r.Failures, r.FailureBudget, r.CreatedAt.Local().Format(time.DateTime), r.Selector)
		}
	})
}

func waveLabel(r *client.Rollout) string {
	if r.Wave >= len(r.Waves) {
		return fmt.Sprintf("%d/%d", len(r.Waves), len(r.Waves))
	}
	return fmt.Sprintf("%d/%d", r.Wave+1, len(r.Waves))
}

func rolloutGet(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "rollout get", &g)
	devices := fs.Bool("devices", false, "list every device's step")
	step := fs.String("step", "", "with --devices: only devices at this step (e.g. failed)")
	wave := fs.Int("wave", 0, "with --devices: only this wave, counted from 1 (0: all)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one rollout ID")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	if *devices {
		ds, err := c.RolloutDevices(ctx, pos[0], *step, *wave-1)
		if err != nil {
			return err
		}
		return emit(e.stdout, g.output, map[string]any{"devices": ds}, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "DEVICE\tWAVE\tSTEP\tSINCE\tPREVIOUS\tGEN\tFAILURE / DETAIL")
			now := time.Now()
			for _, d := range ds {
				why := d.Failure
				if why == "" {
					why = d.Detail
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d\t%s\n", d.Device, d.Wave+1, d.Step, ago(d.StepAt, now), orDash(d.Previous), d.Generation, orDash(why))
			}
		})
	}
	r, err := c.Rollout(ctx, pos[0])
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, r, func(tw *tabwriter.Writer) {
		RenderRollout(tw, r, time.Now())
		if len(r.History) > 0 {
			fmt.Fprintln(tw, "\nhistory:")
			for _, h := range r.History {
				fmt.Fprintf(tw, "  %s\t%s\n", h.At.Local().Format(time.DateTime), h.Message)
			}
		}
	})
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func rolloutAction(ctx context.Context, e *exec, action string, args []string) error {
	var g globals
	fs := newFlags(e, "rollout "+action, &g)
	watch := fs.Bool("watch", false, "watch the rollout afterwards")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one rollout ID")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	r, err := c.RolloutAction(ctx, pos[0], action)
	if err != nil {
		return err
	}
	if *watch {
		return watchRollout(ctx, e, c, g.output, r.ID)
	}
	return emit(e.stdout, g.output, r, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "rollout %s: %s\n", r.ID, phaseLine(r))
	})
}

func phaseLine(r *client.Rollout) string {
	s := r.Phase
	if r.Reason != "" {
		s += " (" + r.Reason + ")"
	}
	return s
}

func rolloutWatchCmd(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "rollout watch", &g)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one rollout ID")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	return watchRollout(ctx, e, c, g.output, pos[0])
}

// errRolloutFailed is returned by watch for a rollout that ended aborted
// or rolled back (exit status 1).
var errRolloutFailed = errors.New("rollout did not succeed")

// watchRollout follows a rollout until it finishes. On a terminal it
// redraws in place; otherwise it writes each picture after the last.
// With -o json or yaml it writes one document per change.
func watchRollout(ctx context.Context, e *exec, c *client.Client, format, id string) error {
	tty := isTerminal(e.stdout)
	var final *client.Rollout
	err := c.WatchRollout(ctx, id, func(r *client.Rollout) error {
		switch format {
		case "json":
			b, err := json.Marshal(r)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%s\n", b)
		case "yaml":
			if err := emit(e.stdout, "yaml", r, nil); err != nil {
				return err
			}
			fmt.Fprintln(e.stdout, "---")
		default:
			var buf bytes.Buffer
			tw := tabwriter.NewWriter(&buf, 0, 4, 2, ' ', 0)
			RenderRollout(tw, r, time.Now())
			tw.Flush()
			if tty {
				io.WriteString(e.stdout, "\x1b[H\x1b[2J")
			} else {
				io.WriteString(e.stdout, "\n")
			}
			e.stdout.Write(buf.Bytes())
		}
		if r.Finished() {
			final = r
			return client.ErrStopWatching
		}
		return nil
	})
	if err != nil {
		return err
	}
	if final != nil && final.Phase != "succeeded" {
		return fmt.Errorf("%w: %s is %s", errRolloutFailed, final.ID, phaseLine(final))
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// stepOrder is the order steps are listed in.
var stepOrder = []string{"pending", "notified", "downloading", "verified", "activated", "healthy", "failed", "timed-out", "skipped", "rolling-back", "rolled-back"}

// RenderRollout writes a rollout as people read it: a header, one line per
// wave with a progress bar and the devices at each step, each gate's
// verdict with its figures under its wave, and the reason of the phase.
func RenderRollout(tw *tabwriter.Writer, r *client.Rollout, now time.Time) {
	fmt.Fprintf(tw, "rollout %s: %s@%s into slot %s, %s\n", r.ID, r.Model, r.Version, r.Slot, strings.ToUpper(r.Phase))
	fmt.Fprintf(tw, "selector %q, %d devices, wave %s, failures %d of a budget of %d, updated %s\n",
		r.Selector, r.Targets, waveLabel(r), r.Failures, r.FailureBudget, ago(&r.UpdatedAt, now))
	// Waves are padded by hand, not by the tab writer, so the gate lines
	// between them do not break their alignment.
	type row struct{ state, progress string }
	rows := make([]row, len(r.Waves))
	stateW, progW := 0, 0
	for i, w := range r.Waves {
		done := 0
		for _, s := range []string{"healthy", "failed", "timed-out", "skipped", "rolled-back"} {
			done += w.Steps[s]
		}
		state := w.State
		if w.Approval && !w.Approved && (w.State == "pending" || w.State == "waiting-approval") {
			state += " (needs approval)"
		}
		rows[i] = row{state, fmt.Sprintf("%s %d/%d", bar(done, w.Size, 24), done, w.Size)}
		stateW, progW = max(stateW, len(state)), max(progW, len(rows[i].progress))
	}
	for i, w := range r.Waves {
		steps := stepCounts(w.Steps)
		if w.DecisionMs != nil {
			steps += fmt.Sprintf("; next step decided %s after its last device", decisionTime(*w.DecisionMs))
		}
		fmt.Fprintf(tw, "  wave %-3d %-*s  %-*s  %s\n", w.Index+1, stateW, rows[i].state, progW, rows[i].progress, steps)
		for _, v := range w.Gates {
			fmt.Fprintf(tw, "      gate %-15s %-12s %s\n", v.Gate, strings.ToUpper(v.Result), v.Detail)
			if f := figures(v.Figures); f != "" {
				fmt.Fprintf(tw, "      %-28s %s\n", "", f)
			}
		}
	}
	if n := sum(r.Late); n > 0 {
		fmt.Fprintf(tw, "  late joiners: %d (%s)\n", n, stepCounts(r.Late))
	}
	if r.Reason != "" {
		fmt.Fprintf(tw, "reason: %s\n", r.Reason)
	}
	switch r.Phase {
	case "waiting-approval":
		fmt.Fprintf(tw, "next: fleet rollout approve %s\n", r.ID)
	case "paused":
		fmt.Fprintf(tw, "next: fleet rollout resume %s (or abort, or rollback)\n", r.ID)
	}
}

// decisionTime renders a decision latency in milliseconds: whole ones
// from 10 ms, one decimal below.
func decisionTime(ms float64) string {
	if ms >= 10 {
		return fmt.Sprintf("%.0f ms", ms)
	}
	return fmt.Sprintf("%.1f ms", ms)
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func stepCounts(m map[string]int) string {
	var parts []string
	for _, s := range stepOrder {
		if n := m[s]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", s, n))
		}
	}
	return strings.Join(parts, ", ")
}

func bar(done, total, width int) string {
	if total <= 0 {
		return "[" + strings.Repeat(" ", width) + "]"
	}
	full := done * width / total
	return "[" + strings.Repeat("#", full) + strings.Repeat(".", width-full) + "]"
}

// figures writes a gate's figures compactly: name=value (limit).
func figures(fs []client.GateFigure) string {
	var parts []string
	for _, f := range fs {
		v := trimFloat(f.Value)
		switch f.Unit {
		case "fraction":
			v = fmt.Sprintf("%.2f%%", f.Value*100)
		case "ms":
			v += "ms"
		}
		p := f.Name + "=" + v
		if f.Limit != nil {
			lim := trimFloat(*f.Limit)
			switch f.Unit {
			case "fraction":
				lim = fmt.Sprintf("%.2f%%", *f.Limit*100)
			case "min":
				lim = ">=" + lim
			}
			p += " (limit " + lim + ")"
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, " ")
}

func trimFloat(v float64) string {
	s := fmt.Sprintf("%.2f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}
