// Command buildmodels builds every example model under models/examples, at
// every version that has a golden file, into bundle files:
//
//	go run ./scripts/buildmodels -out models/examples/build
//
// writes DIR/<name>-<version>.bundle and prints one line per bundle: its
// path and its digest (the SHA-256 of the file). Examples with a
// compile.json (trained XGBoost or ONNX models) are compiled with
// models/compiler instead of built from Go. The misbehaving test
// models of models/examples/testmodels go to DIR/testmodels/ the same way.
// `make models` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/edgefleet/edgefleet/models/build"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(doMain(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func doMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("buildmodels", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "directory to write <name>-<version>.bundle files into (required)")
	root := fs.String("root", "", "repository root (default: found from the working directory)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: buildmodels -out DIR [-root DIR]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *out == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	if err := run(ctx, *root, *out, stdout); err != nil {
		fmt.Fprintf(stderr, "buildmodels: %v\n", err)
		return 1
	}
	return 0
}

func run(ctx context.Context, root, out string, stdout io.Writer) error {
	if root == "" {
		wd, err := os.Getwd()
		if err != nil {
			return err
		}
		if root, err = build.FindRoot(wd); err != nil {
			return err
		}
	}
	examples, err := build.Examples(root)
	if err != nil {
		return err
	}
	if len(examples) == 0 {
		return fmt.Errorf("no examples under %s", filepath.Join(root, build.ExamplesDir))
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return fmt.Errorf("create output directory: %w", err)
	}
	b := &build.Builder{Root: root}
	for _, ex := range examples {
		if len(ex.Versions) == 0 {
			return fmt.Errorf("example %s has no golden-<version>.json, so no version to build", ex.Name)
		}
		for _, v := range ex.Versions {
			bd, err := b.Example(ctx, ex.Name, v)
			if err != nil {
				return err
			}
			data, err := bd.Encode()
			if err != nil {
				return err
			}
			path := filepath.Join(out, fmt.Sprintf("%s-%s.bundle", ex.Name, v))
			if err := writeFile(path, data); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "%s\tsha256:%s\n", path, bd.Digest)
		}
	}
	if err := buildCompiled(ctx, root, out, stdout); err != nil {
		return err
	}
	return buildTestModels(ctx, b, out, stdout)
}

// writeFile replaces path atomically, so a reader (a controller serving the
// directory) never sees half a bundle.
func writeFile(path string, data []byte) error {
	tmp := path + ".part"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
