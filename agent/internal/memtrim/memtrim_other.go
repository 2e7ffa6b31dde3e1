//go:build !linux

package memtrim

// releaseBinary unmaps nothing: only Linux's fault-around maps a binary
// in such large batches, and the agent ships for Linux.
func releaseBinary() (int64, error) { return 0, nil }
