package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/compiler"
)

func runModel(ctx context.Context, e *exec, args []string) error {
	if len(args) == 0 {
		return usageErr("want a subcommand: build, check, predict, push, list or sign")
	}
	switch args[0] {
	case "push":
		return runModelPush(ctx, e, args[1:])
	case "list":
		return runModelList(ctx, e, args[1:])
	case "sign":
		return runModelSign(e, args[1:])
	case "build":
		if from := buildFrom(args[1:]); from != "" && from != "wasm" {
			f, err := compiler.ParseFormat(from)
			if err != nil {
				return usageErr("--from %q: use wasm, xgboost or onnx", from)
			}
			return runModelCompile(ctx, e, f, args[1:])
		}
		return runModelBuild(e, args[1:])
	case "predict":
		return runModelPredict(ctx, e, args[1:])
	case "check":
		return runModelCheck(ctx, e, args[1:])
	}
	return usageErr("unknown subcommand %q: want build, check, predict, push, list or sign", args[0])
}

func runModelPush(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "model push", &g)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one BUNDLE file")
	}
	// Decode locally first: a bad bundle is refused here, naming the file,
	// before anything is sent.
	data, err := os.ReadFile(pos[0])
	if err != nil {
		return err
	}
	if len(data) > bundle.MaxBundleSize {
		return fmt.Errorf("bundle %s: %d bytes, over the %d byte limit", pos[0], len(data), bundle.MaxBundleSize)
	}
	if _, err := bundle.Decode(data); err != nil {
		return fmt.Errorf("bundle %s: %w", pos[0], err)
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	m, err := c.PushModel(ctx, data)
	if err != nil {
		return fmt.Errorf("push %s: %w", pos[0], err)
	}
	return emit(e.stdout, g.output, m, func(tw *tabwriter.Writer) {
		fmt.Fprintf(tw, "pushed %s@%s\tsha256:%s\t%d bytes\n", m.Name, m.Version, m.Digest, m.Size)
	})
}

func runModelList(ctx context.Context, e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "model list", &g)
	if _, err := parse(fs, args); err != nil {
		return err
	}
	c, err := g.client()
	if err != nil {
		return err
	}
	ms, err := c.Models(ctx)
	if err != nil {
		return err
	}
	return emit(e.stdout, g.output, map[string]any{"models": ms}, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "MODEL\tVERSION\tDIGEST\tSIZE\tUPLOADED")
		now := time.Now()
		for _, m := range ms {
			fmt.Fprintf(tw, "%s\t%s\t%.12s\t%d\t%s\n", m.Name, m.Version, m.Digest, m.Size, ago(m.CreatedAt, now))
		}
	})
}

// runModelBuild packs a hand-written module and its manifest into a bundle.
// The manifest's module field is filled in from the module.
func runModelBuild(e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "model build", &g)
	from := fs.String("from", "wasm", "source kind: wasm (a module written against models/ABI.md), xgboost or onnx (a trained model file, compiled)")
	module := fs.String("module", "", "WASM module file (with --from wasm)")
	manifest := fs.String("manifest", "", "manifest JSON file: name, version, abi, inputs, outputs, limits, tests")
	out := fs.String("out", "", "bundle file to write")
	fs.StringVar(out, "O", "", "short for --out")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	if *from != "wasm" {
		return usageErr("--from %q: use wasm, xgboost or onnx", *from)
	}
	if *module == "" || *manifest == "" || *out == "" {
		return usageErr("--module, --manifest and --out are required")
	}
	wasm, err := os.ReadFile(*module)
	if err != nil {
		return err
	}
	mj, err := os.ReadFile(*manifest)
	if err != nil {
		return err
	}
	var m bundle.Manifest
	if err := json.Unmarshal(mj, &m); err != nil {
		return fmt.Errorf("manifest %s: %w", *manifest, err)
	}
	b, err := bundle.New(m, wasm)
	if err != nil {
		return fmt.Errorf("manifest %s: %w", *manifest, err)
	}
	data, err := b.Encode()
	if err != nil {
		return err
	}
	if err := os.WriteFile(*out, data, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "wrote %s: %s@%s sha256:%s\n", *out, b.Manifest.Name, b.Manifest.Version, b.Digest)
	return nil
}
