//go:build !unix

package sim

// ensureFileLimit has nothing to raise where there are no rlimits.
func ensureFileLimit(int) error { return nil }
