package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/compiler"
	"github.com/edgefleet/edgefleet/models/host"
)

// buildCompiled compiles every example under models/examples that holds a
// compile.json (a trained model file, its test vectors and reference
// sample) with the model compiler, checks each bundle in the agent's
// runtime, and writes it to out/<name>-<version>.bundle, printing a line
// per bundle as run does.
func buildCompiled(ctx context.Context, root, out string, stdout io.Writer) error {
	dirs, err := compiler.FindSpecs(filepath.Join(root, build.ExamplesDir))
	if err != nil {
		return err
	}
	h, err := host.New(ctx, host.Options{PoolSize: 1})
	if err != nil {
		return err
	}
	defer h.Close(context.WithoutCancel(ctx))
	for _, dir := range dirs {
		spec, err := compiler.ReadSpec(dir)
		if err != nil {
			return err
		}
		res, err := spec.Build()
		if err != nil {
			return err
		}
		m, err := h.Load(ctx, res.Bundle)
		if err != nil {
			return fmt.Errorf("example %s: compiled bundle refused by the runtime: %w", spec.Name, err)
		}
		_ = m.Close(ctx)
		path := filepath.Join(out, fmt.Sprintf("%s-%s.bundle", spec.Name, spec.Version))
		if err := compiler.WriteBundle(path, res.Bundle); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s\tsha256:%s\n", path, res.Bundle.Digest)
	}
	return nil
}
