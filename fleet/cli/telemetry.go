package cli

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/edgefleet/edgefleet/fleet/client"
)

const telemetryUsage = "[--model M] [--version V] [--device ID] [--rollout R [--wave N]] [--since 1h] [--until T] [--by version|device]"

func runTelemetry(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "telemetry", &g)
	var q client.TelemetryQuery
	fs.StringVar(&q.Model, "model", "", "model name")
	fs.StringVar(&q.Version, "version", "", "model version")
	fs.StringVar(&q.Device, "device", "", "one device")
	fs.StringVar(&q.Rollout, "rollout", "", "the devices of a rollout (its model and version unless given)")
	fs.IntVar(&q.Wave, "wave", -1, "with --rollout: one wave's devices, 0 for the first")
	fs.StringVar(&q.Since, "since", "1h", "start: RFC 3339 time or duration back from now (90m, 7d)")
	fs.StringVar(&q.Until, "until", "", "end: RFC 3339 time or duration back from now (default now)")
	fs.StringVar(&q.By, "by", "version", "group by version or device")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if q.Wave >= 0 && q.Rollout == "" {
		return usageErr("--wave needs --rollout")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	sum, err := c.Telemetry(ctx, q)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, sum, func(tw *tabwriter.Writer) { TelemetryTable(tw, sum.Groups) })
}

// TelemetryTable writes telemetry figures as a table, one row per group.
func TelemetryTable(tw *tabwriter.Writer, groups []client.TelemetryFigures) {
	fmt.Fprintln(tw, "MODEL\tDEVICE\tDEVICES\tINFERENCES\tERRORS\tERROR RATE\tP50\tP95\tP99\tDRIFT PSI\tDRIFT JS")
	for _, f := range groups {
		dev := f.DeviceID
		if dev == "" {
			dev = "*"
		}
		psi, js := "-", "-"
		if d := f.Drift; d != nil && len(d.Outputs) > 0 {
			psi, js = fmt.Sprintf("%.3f", d.MaxOutputPSI), fmt.Sprintf("%.3f", d.MaxOutputJS)
		}
		fmt.Fprintf(tw, "%s@%s\t%s\t%d\t%d\t%d\t%.2f%%\t%.2fms\t%.2fms\t%.2fms\t%s\t%s\n", f.Model, f.Version, dev, f.Devices,
			f.Count, f.Errors, f.ErrorRate*100, f.LatencyP50Ms, f.LatencyP95Ms, f.LatencyP99Ms, psi, js)
	}
	for _, f := range groups {
		if d := f.Drift; d != nil && d.Note != "" && d.Note != "no reference" {
			fmt.Fprintf(tw, "note %s@%s:\t%s\n", f.Model, f.Version, d.Note)
		}
	}
}
