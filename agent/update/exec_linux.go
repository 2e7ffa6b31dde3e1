package update

import (
	"errors"
	"os"
	"strconv"
	"syscall"
)

// childAttr kills the agent when its supervisor dies, so a supervisor
// started again never races a stray agent.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// Exec replaces the running process with exe, keeping its process id (so
// a supervisor or systemd keeps watching the same process), its arguments
// args (args[0] is the program name) and the environment.
func Exec(exe string, args []string) error {
	return syscall.Exec(exe, args, os.Environ())
}

func clearCloseOnExec(fd uintptr) error {
	if _, _, errno := syscall.Syscall(syscall.SYS_FCNTL, fd, syscall.F_SETFD, 0); errno != 0 {
		return errno
	}
	return nil
}

// DieWithSupervisor makes an agent started by Supervise die with it. The
// supervisor asks for that when it starts the agent (Pdeathsig), but the
// kernel keeps the setting on the thread that asked: when a self-update
// re-executes the agent from another thread, the new program has lost it.
// So the agent sets it again at every start, and exits if its supervisor
// died before that.
func DieWithSupervisor() error {
	v := os.Getenv(SupervisorPIDEnv)
	if v == "" {
		return nil
	}
	pid, err := strconv.Atoi(v)
	if err != nil {
		return nil
	}
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0); errno != 0 {
		return errno
	}
	if os.Getppid() != pid {
		return errors.New("the supervisor that started this agent is gone")
	}
	return nil
}
