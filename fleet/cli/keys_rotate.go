package cli

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/fleet/client"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

// DefaultReleaseOverlap is how long the old release key stays trusted
// after a release rotation: long enough to re-sign and re-assign what runs
// (agents check stored bundles again at each start).
const DefaultReleaseOverlap = 30 * 24 * time.Hour

func runKeysList(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "keys list", &g)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErr("keys list takes no arguments")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	l, err := c.Keys(ctx)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, l, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "director key in use: %s\n\n", l.DirectorKeyID)
		fmt.Fprintln(tw, "ROLE\tSEQ\tKEY\tSIGNED BY\tISSUED\tOLD KEYS RETIRE")
		for _, a := range l.Announcements {
			retire := "at once"
			if a.RetirePreviousAt != nil {
				retire = a.RetirePreviousAt.Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", a.Role, a.Sequence, a.KeyID, a.SignedBy, a.IssuedAt.Format(time.RFC3339), retire)
		}
	})
}

func printAnnouncement(e *exec, g globals, a *client.KeyAnnouncement) error {
	return emit(e.stdout, g.output, a, func(tw *tabwriter.Writer) {
		retire := "at once"
		if a.RetirePreviousAt != nil {
			retire = a.RetirePreviousAt.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s key %s announced (sequence %d, signed by %s); previous keys retire %s\n", a.Role, a.KeyID, a.Sequence, a.SignedBy, retire)
	})
}

func runRotateDirector(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "keys rotate-director", &g)
	overlap := fs.String("overlap", "", "how long agents keep trusting the old key (default: the desired-state expiry, 720h); 0s for a compromised key")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErr("keys rotate-director takes no arguments")
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	a, err := c.RotateDirectorKey(ctx, *overlap)
	if err != nil {
		return err
	}
	return printAnnouncement(e, g, a)
}

// readAnyPublicKey reads a public key file, or the public half of a
// private key file.
func readAnyPublicKey(path string) (ed25519.PublicKey, error) {
	pub, err := trust.ReadPublicKey(path)
	if err == nil {
		return pub, nil
	}
	priv, perr := trust.ReadPrivateKey(path)
	if perr != nil {
		return nil, err
	}
	return priv.Public().(ed25519.PublicKey), nil
}

// runRotateRelease signs a release key announcement with the old release
// key, offline: it needs the controller only to learn the next sequence,
// and not at all with --sequence.
func runRotateRelease(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "keys rotate-release", &g)
	oldKey := fs.String("old-key", "", "the current release private key file (it signs the announcement)")
	newKey := fs.String("new-key", "", "the new release key: its .pub file (or its private key file)")
	seq := fs.Uint64("sequence", 0, "the announcement's sequence: one above the last release announcement (default: asked from the controller)")
	overlap := fs.Duration("overlap", DefaultReleaseOverlap, "how long agents keep trusting the old key; 0s retires it at once (a compromised key)")
	out := fs.String("out", "", "announcement file to write (default release-rotation-SEQ.pb)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || *oldKey == "" || *newKey == "" {
		return usageErr("keys rotate-release needs --old-key and --new-key and takes no arguments")
	}
	if *overlap < 0 {
		return usageErr("--overlap %s: want 0s or more", *overlap)
	}
	priv, err := trust.ReadPrivateKey(*oldKey)
	if err != nil {
		return fmt.Errorf("--old-key: %w", err)
	}
	pub, err := readAnyPublicKey(*newKey)
	if err != nil {
		return fmt.Errorf("--new-key: %w", err)
	}
	if pub.Equal(priv.Public()) {
		return usageErr("--new-key is the same key as --old-key; make a new one with `fleet keys init --dir DIR`")
	}
	if *seq == 0 {
		c, err := g.client()
		if err != nil {
			return err
		}
		l, err := c.Keys(ctx)
		if err != nil {
			return fmt.Errorf("asking the controller for the next sequence (or give --sequence N offline): %w", err)
		}
		*seq = l.LastSequence("release") + 1
	}
	now := time.Now()
	var retire time.Time
	if *overlap > 0 {
		retire = now.Add(*overlap)
	}
	signed, err := trust.SignAnnouncement(priv, trust.NewAnnouncement(pb.KeyRole_KEY_ROLE_RELEASE, pub, *seq, now, retire))
	if err != nil {
		return err
	}
	b, err := proto.Marshal(signed)
	if err != nil {
		return err
	}
	dst := *out
	if dst == "" {
		dst = fmt.Sprintf("release-rotation-%d.pb", *seq)
	}
	if err := writeExclusive(dst, b, 0o644); err != nil {
		return fmt.Errorf("announcement file: %w", err)
	}
	fmt.Fprintf(e.stdout, "release key %s announced by %s (sequence %d): %s\n", trust.KeyID(pub), trust.KeyID(priv.Public().(ed25519.PublicKey)), *seq, dst)
	fmt.Fprintf(e.stderr, "next: fleet keys push %s (admin token); then sign new bundles with the new key\n", dst)
	return nil
}

func runKeysPush(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "keys push", &g)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("keys push takes one announcement FILE (from fleet keys rotate-release)")
	}
	b, err := os.ReadFile(pos[0])
	if err != nil {
		return err
	}
	if len(b) > trust.MaxAnnouncement+256 {
		return fmt.Errorf("%s is %d bytes; an announcement file is a few hundred", pos[0], len(b))
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	a, err := c.PushAnnouncement(ctx, b)
	if err != nil {
		return err
	}
	return printAnnouncement(e, g, a)
}
