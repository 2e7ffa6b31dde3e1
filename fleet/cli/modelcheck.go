package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
)

// errCheckFailed marks a bundle that `fleet model check` found problems
// in; the report itself is already on stdout.
type errCheckFailed struct {
	path     string
	problems int
}

func (e errCheckFailed) Error() string {
	return fmt.Sprintf("%s: %d problems; fix them before pushing (a device would refuse this bundle)", e.path, e.problems)
}

// runModelCheck validates a bundle against Model ABI v1 with the runtime
// the agent uses (models/host) and prints every problem it finds: the
// manifest, limits, golden vectors' shape, module, imports, exports, ABI
// version, metadata, and every golden vector's answers. It exits non-zero
// on any failure; warnings alone pass.
func runModelCheck(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "model check", &g)
	pages := fs.Uint("max-memory-pages", host.DefaultMaxMemoryPages, "the device's cap on a model's memory, in 64 KiB pages, as in the agent's configuration")
	timeout := fs.Duration("default-timeout", host.DefaultTimeout, "the device's inference deadline for a manifest that sets none")
	cache := fs.String("cache-dir", "", "wazero compilation cache directory, so that checking the same module again skips compiling it (default: none)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one BUNDLE file")
	}
	switch g.output {
	case "table", "json", "yaml":
	default:
		return usageErr("-o %q: choose table, json or yaml", g.output)
	}
	if *pages == 0 || *pages > 65536 {
		return usageErr("--max-memory-pages %d: want 1 to 65536", *pages)
	}
	path := pos[0]
	data, err := readCapped(path, bundle.MaxBundleSize)
	if err != nil {
		return err
	}
	h, err := host.New(ctx, host.Options{
		CacheDir:       *cache,
		MaxMemoryPages: uint32(*pages),
		DefaultTimeout: *timeout,
		PoolSize:       1,
	})
	if err != nil {
		return err
	}
	defer h.Close(context.WithoutCancel(ctx))
	r, err := h.CheckFile(ctx, data)
	if err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	if err := emit(e.stdout, g.output, r, func(tw *tabwriter.Writer) { printReport(tw, path, r) }); err != nil {
		return err
	}
	if n := r.Count(host.Fail); n > 0 {
		return errCheckFailed{path: path, problems: n}
	}
	return nil
}

// readCapped reads a file of at most limit bytes, naming it in errors.
func readCapped(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("bundle %s is over the %d byte limit of a bundle", path, limit)
	}
	return data, nil
}

// printReport writes one line per finding, then a summary.
func printReport(tw *tabwriter.Writer, path string, r *host.Report) {
	what := path
	if r.Name != "" {
		what = fmt.Sprintf("%s: %s %s, model ABI v%d", path, r.Name, r.Version, r.ABI)
	}
	if r.Digest != "" {
		what += fmt.Sprintf(", sha256:%.12s", r.Digest)
	}
	fmt.Fprintln(tw, what)
	for _, f := range r.Findings {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Severity, f.Check, f.Message)
	}
	fails, warns := r.Count(host.Fail), r.Count(host.Warn)
	switch {
	case fails > 0:
		fmt.Fprintf(tw, "%d problems, %d warnings: a device would refuse this bundle\n", fails, warns)
	case warns > 0:
		fmt.Fprintf(tw, "passed with %d warnings\n", warns)
	default:
		fmt.Fprintf(tw, "passed: the bundle conforms to model ABI v%d\n", host.ABIVersion)
	}
}
