package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
)

// runToken manages API tokens; every subcommand needs an admin token.
func runToken(ctx context.Context, e *exec, args []string) error {
	if len(args) == 0 {
		return usageErr("want: fleet token create --name NAME --role viewer|operator|admin | fleet token list | fleet token revoke NAME")
	}
	var g globals
	fs := newFlags(e, "token "+args[0], &g)
	name := fs.String("name", "", "token name, recorded in the audit log as who acted (create)")
	role := fs.String("role", "", "viewer (read), operator (models, assignments, rollouts) or admin (tokens, keys) (create)")
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	switch args[0] {
	case "create":
		if len(pos) != 0 {
			return usageErr("token create takes no arguments; give --name and --role")
		}
		if *name == "" || *role == "" {
			return usageErr("token create needs --name and --role")
		}
		t, err := c.CreateToken(ctx, *name, *role)
		if err != nil {
			return err
		}
		if g.output != "table" {
			return emit(e.stdout, g.output, t, nil)
		}
		// The secret alone on stdout, so TOKEN=$(fleet token create ...)
		// works; the advice on stderr.
		fmt.Fprintln(e.stdout, t.Secret)
		fmt.Fprintf(e.stderr, "token %q (role %s) created; it is shown only now: store it, then pass it with --token or EDGEFLEET_TOKEN\n", t.Name, t.Role)
		return nil
	case "list":
		if len(pos) != 0 {
			return usageErr("token list takes no arguments")
		}
		ts, err := c.Tokens(ctx)
		if err != nil {
			return err
		}
		return emit(e.stdout, g.output, map[string]any{"tokens": ts}, func(tw *tabwriter.Writer) {
			fmt.Fprintln(tw, "NAME\tROLE\tCREATED BY\tCREATED\tREVOKED")
			for _, t := range ts {
				revoked := "-"
				if t.RevokedAt != nil {
					revoked = t.RevokedAt.Local().Format(time.DateTime)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.Name, t.Role, t.CreatedBy, t.CreatedAt.Local().Format(time.DateTime), revoked)
			}
		})
	case "revoke":
		if len(pos) != 1 {
			return usageErr("want one token NAME")
		}
		if err := c.RevokeToken(ctx, pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "token %q revoked\n", pos[0])
		return nil
	}
	return usageErr("unknown token subcommand %q: want create, list or revoke", args[0])
}

// runAudit shows the audit log, newest first.
func runAudit(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "audit", &g)
	limit := fs.Int("limit", 50, "how many entries, newest first (at most 1000)")
	who := fs.String("who", "", "only the changes made with this token name")
	before := fs.Int64("before", 0, "only entries older than this id (the next page)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if *limit < 1 || *limit > 1000 {
		return usageErr("--limit %d: want 1 to 1000", *limit)
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	es, next, err := c.Audit(ctx, client.AuditQuery{Limit: *limit, Who: *who, BeforeID: *before})
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, map[string]any{"entries": es, "next": next}, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "ID\tWHEN\tWHO\tROLE\tACTION\tTARGET\tRESULT")
		for _, a := range es {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.At.Local().Format(time.DateTime), a.Who, a.Role, a.Action, a.Target, a.Result)
		}
		if next != 0 {
			fmt.Fprintf(tw, "(older entries: fleet audit --before %d)\n", next)
		}
	})
}
