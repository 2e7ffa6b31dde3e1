package cli

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/edgefleet/edgefleet/fleet/client"
)

func runAssign(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "assign", &g)
	sel := fs.String("l", "", "label selector of the target devices (required; use -l '' --all for every device)")
	all := fs.Bool("all", false, "target every device")
	slot := fs.String("slot", "default", "model slot on the device")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one MODEL@VERSION")
	}
	name, version, ok := strings.Cut(pos[0], "@")
	if !ok || name == "" || version == "" {
		return usageErr("%q: write the model as NAME@VERSION, e.g. grid-anomaly@1.0.0", pos[0])
	}
	if *sel == "" && !*all {
		return usageErr("no selector: pass -l SELECTOR, or --all to target every device")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	ids, err := c.Assign(ctx, client.Assignment{Model: name, Version: version, Slot: *slot, Selector: *sel})
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, map[string]any{"devices": ids}, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "assigned %s@%s (slot %s) to %d device(s): %s\n", name, version, *slot, len(ids), strings.Join(ids, ", "))
	})
}
