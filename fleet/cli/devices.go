package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

func runDevices(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "devices", &g)
	sel := fs.String("l", "", "label selector, e.g. 'region=eu,hw in (jetson,rpi5),!lab'")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q (use -l for a selector)", pos[0])
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	devs, err := c.Devices(ctx, *sel)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, map[string]any{"devices": devs}, func(tw *tabwriter.Writer) {
		DevicesTable(tw, devs, time.Now())
	})
}

// DevicesTable writes the device list as a table; the demo shows the same one.
func DevicesTable(tw *tabwriter.Writer, devs []client.Device, now time.Time) {
	fmt.Fprintln(tw, "DEVICE\tONLINE\tHEALTH\tMODEL\tGEN\tINFERENCES\tERRORS\tSPOOL\tLAST SEEN\tLABELS")
	for _, d := range devs {
		model := "-"
		for _, s := range d.Slots {
			if s.Active != nil {
				model = s.Active.String()
				if s.Slot != "default" {
					model = s.Slot + ":" + model
				}
				break
			}
		}
		var want uint64
		if d.Desired != nil {
			want = d.Desired.Generation
		}
		gen := fmt.Sprintf("%d/%d", d.ReportedGeneration, want)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\n", d.ID, yesNo(d.Online), d.Health, model, gen,
			d.Inferences, d.InferenceErrors, d.SpoolDepth, ago(d.LastSeen, now), formatLabels(d.Labels))
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func runDevice(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "device", &g)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want exactly one device id")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	d, err := c.Device(ctx, pos[0])
	if err != nil {
		return fmt.Errorf("device %q: %w", pos[0], err)
	}
	now := time.Now()
	// The last hour's figures, for the table; an older controller without
	// the endpoint just leaves them out.
	tel, _ := c.DeviceTelemetry(ctx, pos[0], "1h")
	return emit(e.stdout, g.output, d, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "Device:\t%s\n", d.ID)
		fmt.Fprintf(tw, "Online:\t%s (last seen %s)\n", yesNo(d.Online), ago(d.LastSeen, now))
		fmt.Fprintf(tw, "Health:\t%s\n", d.Health)
		fmt.Fprintf(tw, "Agent:\t%s\n", d.AgentVersion)
		fmt.Fprintf(tw, "Labels:\t%s\n", formatLabels(d.Labels))
		var want uint64
		if d.Desired != nil {
			want = d.Desired.Generation
		}
		behind := ""
		if d.ReportedGeneration < want {
			behind = " (behind)"
		}
		fmt.Fprintf(tw, "Generation:\treported %d, desired %d%s\n", d.ReportedGeneration, want, behind)
		fmt.Fprintf(tw, "Spool:\t%d records waiting\n", d.SpoolDepth)
		fmt.Fprintf(tw, "Inferences:\t%d stored, %d errors\n", d.Inferences, d.InferenceErrors)
		for _, s := range d.Slots {
			since := "-"
			if s.ActiveSince != nil {
				since = s.ActiveSince.Local().Format(time.RFC3339) + " (" + ago(s.ActiveSince, now) + ")"
			}
			fmt.Fprintf(tw, "Slot %s:\tactive %s since %s, previous %s\n", s.Slot, s.Active, since, s.Previous)
			if s.Pending != nil {
				fmt.Fprintf(tw, "\tpending %s\n", s.Pending)
			}
			if s.LastError != "" {
				fmt.Fprintf(tw, "\tlast error: %s\n", s.LastError)
			}
			if sh := s.Shadow; sh != nil {
				fmt.Fprintf(tw, "\t%s\n", shadowLine(sh, now))
			}
		}
		if d.Desired != nil {
			for _, s := range d.Desired.Slots {
				fmt.Fprintf(tw, "Desired %s:\t%s@%s\n", s.Slot, s.Name, s.Version)
			}
		}
		if tel != nil {
			for _, f := range tel.Groups {
				drift := ""
				if f.Drift != nil && len(f.Drift.Outputs) > 0 {
					drift = fmt.Sprintf(", drift PSI %.3f JS %.3f", f.Drift.MaxOutputPSI, f.Drift.MaxOutputJS)
				}
				fmt.Fprintf(tw, "Last hour %s@%s:\t%d inferences, %.2f%% errors, p50 %.2fms p95 %.2fms p99 %.2fms%s\n",
					f.Model, f.Version, f.Count, f.ErrorRate*100, f.LatencyP50Ms, f.LatencyP95Ms, f.LatencyP99Ms, drift)
			}
		}
		if len(d.LastEvents) > 0 {
			fmt.Fprintln(tw, "Last events:")
			for _, ev := range d.LastEvents {
				fmt.Fprintf(tw, "  %s\t%s\t%s@%s\t%s\n", ev.At.Local().Format("15:04:05"), ev.Kind, ev.Name, ev.Version, ev.Detail)
			}
		}
	})
}

// shadowLine says how a slot's shadow candidate compares with its active
// version, in one line of `fleet device`.
func shadowLine(sh *client.Shadow, now time.Time) string {
	agreement := "-"
	if sh.Agreement != nil {
		agreement = fmt.Sprintf("%.2f%%", *sh.Agreement*100)
	}
	return fmt.Sprintf("shadow %s since %s: %d compared, %d agreed (%s), %d errors, score diff max %.4g mean %.4g, p99 %.2fms vs active %.2fms",
		sh.Candidate, ago(sh.Since, now), sh.Compared, sh.Agreed, agreement, sh.Errors, sh.MaxScoreDiff, sh.MeanScoreDiff,
		float64(sh.CandidateP99Us)/1000, float64(sh.ActiveP99Us)/1000)
}
