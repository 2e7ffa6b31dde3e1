package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"text/tabwriter"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/proto/release"
	"github.com/edgefleet/edgefleet/proto/trust"
)

const agentUsage = "release push BINARY --version X [--os OS --arch ARCH] --key release.key | release list"

func runAgent(ctx context.Context, e *exec, args []string) error {
	if len(args) < 2 || args[0] != "release" {
		return usageErr("want: fleet agent %s", agentUsage)
	}
	switch args[1] {
	case "push":
		return agentReleasePush(ctx, e, args[2:])
	case "list":
		return agentReleaseList(ctx, e, args[2:])
	}
	return usageErr("unknown verb %q; want fleet agent %s", args[1], agentUsage)
}

// elfArch maps an ELF machine to Go's architecture name, so a push can
// catch a binary built for another architecture than it claims.
var elfArch = map[elf.Machine]string{
	elf.EM_X86_64: "amd64", elf.EM_AARCH64: "arm64", elf.EM_ARM: "arm", elf.EM_386: "386",
	elf.EM_RISCV: "riscv64", elf.EM_PPC64: "ppc64le", elf.EM_S390: "s390x", elf.EM_MIPS: "mips",
}

func agentReleasePush(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "agent release push", &g)
	version := fs.String("version", "", "the release's version, MAJOR.MINOR.PATCH (what the binary's --version prints)")
	goos := fs.String("os", runtime.GOOS, "operating system the binary is built for (Go's name)")
	goarch := fs.String("arch", runtime.GOARCH, "architecture the binary is built for (Go's name)")
	key := fs.String("key", "", "release private key file (fleet keys init) that signs the release")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one BINARY: fleet agent release push BINARY --version X --key release.key")
	}
	if *version == "" || *key == "" {
		return usageErr("--version and --key are required")
	}
	priv, err := trust.ReadPrivateKey(*key)
	if err != nil {
		return err
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	if ef, err := elf.NewFile(f); err == nil {
		if got, ok := elfArch[ef.Machine]; ok && got != *goarch {
			return fmt.Errorf("%s is an ELF binary for %s, but --arch is %s; pass --arch %s", pos[0], got, *goarch, got)
		}
		if *goos != "linux" && *goos != "android" && *goos != "freebsd" && *goos != "netbsd" && *goos != "openbsd" {
			return fmt.Errorf("%s is an ELF binary, but --os is %s; pass --os linux (or the OS it is built for)", pos[0], *goos)
		}
	}
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(f, release.MaxBinary+1))
	if err != nil {
		return fmt.Errorf("read %s: %w", pos[0], err)
	}
	m := release.Manifest{Version: *version, OS: *goos, Arch: *goarch, SHA256: hex.EncodeToString(h.Sum(nil)), Size: n}
	doc, err := release.Sign(priv, m)
	if err != nil {
		return fmt.Errorf("%s: %w", pos[0], err)
	}
	raw, err := doc.Encode()
	if err != nil {
		return err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	rel, err := c.PushAgentRelease(ctx, raw, f)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, rel, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "agent release %s for %s/%s stored (sha256 %s, %d bytes, signed by %s)\n",
			rel.Version, rel.OS, rel.Arch, rel.SHA256, rel.Size, trust.KeyID(priv.Public().(ed25519.PublicKey)))
		fmt.Fprintf(tw, "roll it out: fleet rollout create --agent-release %s -l SELECTOR\n", rel.Version)
	})
}

func agentReleaseList(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "agent release list", &g)
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	rels, err := c.AgentReleases(ctx)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, rels, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "VERSION\tOS/ARCH\tSIZE\tSHA256\tPUSHED")
		for _, r := range rels {
			fmt.Fprintf(tw, "%s\t%s/%s\t%d\t%s\t%s\n", r.Version, r.OS, r.Arch, r.Size, r.SHA256[:16], r.CreatedAt.UTC().Format("2006-01-02 15:04"))
		}
	})
}

// withAgent turns a flags-built rollout specification into one of the
// agent release version.
func withAgent(spec []byte, version string) ([]byte, error) {
	var s client.RolloutSpec
	if err := json.Unmarshal(spec, &s); err != nil {
		return nil, err
	}
	s.Model, s.Slot, s.Agent = "", "", version
	return json.Marshal(s)
}
