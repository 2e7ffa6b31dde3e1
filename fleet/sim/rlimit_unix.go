//go:build unix

package sim

import (
	"fmt"
	"syscall"
)

// filesPerAgent is the open files one simulated device needs: its broker
// connection. Downloads add an HTTP connection and a file for a moment
// each (more if their idle connections are kept: see fleet sim), covered
// by the spare.
const filesPerAgent = 1

// filesSpare covers what the process needs besides the devices: its own
// files, downloads in progress, the Go runtime.
const filesSpare = 1024

// ensureFileLimit raises the soft limit on open files to what n devices
// need, up to the hard limit, and fails with what to do when even that is
// too low.
func ensureFileLimit(n int) error {
	need := uint64(n*filesPerAgent + filesSpare)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("read the open-file limit: %w", err)
	}
	if lim.Cur >= need {
		return nil
	}
	if lim.Max < need {
		return fmt.Errorf("%d simulated devices need about %d open files, but the hard limit is %d; raise it (ulimit -Hn %d as root, or LimitNOFILE= in a systemd unit) or simulate fewer devices",
			n, need, lim.Max, need)
	}
	lim.Cur = need
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("raise the open-file limit to %d for %d devices: %w; run ulimit -n %d first", need, n, err, need)
	}
	return nil
}
