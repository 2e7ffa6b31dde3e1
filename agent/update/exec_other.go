//go:build !linux

package update

import (
	"os"
	"syscall"
)

func childAttr() *syscall.SysProcAttr { return nil }

// Exec replaces the running process with exe (see the Linux version).
func Exec(exe string, args []string) error {
	return syscall.Exec(exe, args, os.Environ())
}

func clearCloseOnExec(fd uintptr) error {
	if _, _, errno := syscall.Syscall(syscall.SYS_FCNTL, fd, syscall.F_SETFD, 0); errno != 0 {
		return errno
	}
	return nil
}

// DieWithSupervisor is a no-op where the kernel has no parent-death signal.
func DieWithSupervisor() error { return nil }
