package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/edgefleet/edgefleet/models/build"
	"github.com/edgefleet/edgefleet/models/examples/testmodels"
)

// TestModelsDir is the subdirectory of -out that receives the misbehaving
// test models (models/examples/testmodels), kept apart so that nothing
// serving the example bundles offers them by mistake.
const TestModelsDir = "testmodels"

// buildTestModels writes every version of every test model to
// out/testmodels/<name>-<version>.bundle, printing a line per bundle as
// run does.
func buildTestModels(ctx context.Context, b *build.Builder, out string, stdout io.Writer) error {
	list, err := testmodels.List(b.Root)
	if err != nil {
		return err
	}
	dir := filepath.Join(out, TestModelsDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create output directory: %w", err)
	}
	for _, tm := range list {
		for _, v := range tm.Versions {
			bd, err := testmodels.Build(ctx, b, tm.Name, v)
			if err != nil {
				return err
			}
			data, err := bd.Encode()
			if err != nil {
				return err
			}
			path := filepath.Join(dir, fmt.Sprintf("%s-%s.bundle", tm.Name, v))
			if err := writeFile(path, data); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "%s\tsha256:%s\n", path, bd.Digest)
		}
	}
	return nil
}
