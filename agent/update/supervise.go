package update

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"syscall"
	"time"
)

// SupervisorPIDEnv names the environment variable that tells an agent the
// pid of the supervisor that started it (see DieWithSupervisor).
const SupervisorPIDEnv = "EDGEFLEET_SUPERVISOR_PID"

// SuperviseOptions configure the watchdog.
type SuperviseOptions struct {
	// Exe is the agent binary; Args its arguments (without the program
	// name). DataDir is the agent's data directory (the record is there).
	Exe     string
	Args    []string
	DataDir string
	// MaxStarts is how many starts a new version gets in its trial (3);
	// MaxExits how many exits it may have in its probation (3).
	MaxStarts, MaxExits int
	// Poll is how often the record is read while the agent runs (250ms).
	Poll time.Duration
	// StopTimeout is how long a stopping agent gets after SIGTERM (8s,
	// inside the usual 10s of service managers and tests).
	StopTimeout time.Duration
	// MinBackoff and MaxBackoff bound the pause before restarting an agent
	// that exited on its own (1s, 30s).
	MinBackoff, MaxBackoff time.Duration
	Stdout, Stderr         io.Writer
	Logger                 *slog.Logger
	Now                    func() time.Time
}

// Supervise runs the agent as a child and keeps it running until ctx ends:
// the watchdog of self-updates. It is deliberately small: everything it
// knows is in the record and the files NAME and NAME.old, so a supervisor
// killed at any moment and started again carries on where it was.
//
// Per round: repair (a record "restored" while NAME is not the old binary
// is restored again), count the start of a version on trial (too many:
// restore), start the agent, then watch it: a version on trial that passes
// its deadline is killed and restored; a version on trial that exits is
// restored at once (unless NAME is still the old binary: the agent died
// before its swap, and the record goes); a version in probation that
// exits too often is restored. An agent that exits otherwise is restarted
// after a backoff. The child is killed with the supervisor (Pdeathsig), so
// a restarted supervisor never finds a stray agent holding the port.
func Supervise(ctx context.Context, o SuperviseOptions) error {
	if o.Exe == "" || o.DataDir == "" {
		return errors.New("supervise: Exe and DataDir are required")
	}
	if o.MaxStarts <= 0 {
		o.MaxStarts = 3
	}
	if o.MaxExits <= 0 {
		o.MaxExits = 3
	}
	if o.Poll <= 0 {
		o.Poll = 250 * time.Millisecond
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 8 * time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(30*time.Second, o.MinBackoff)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	// The child's Pdeathsig fires when the thread that started it ends;
	// this goroutine keeps its thread until Supervise returns.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := &supervisor{o: o, log: o.Logger.With("supervisor", o.Exe)}
	backoff := o.MinBackoff
	for ctx.Err() == nil {
		if err := s.prepare(); err != nil {
			s.log.Error("update record unusable; starting the agent as it is", "err", err)
		}
		started := o.Now()
		restored, err := s.runOnce(ctx)
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			break
		}
		switch {
		case restored:
			backoff = o.MinBackoff
			continue // the previous binary starts at once
		case o.Now().Sub(started) > 2*o.MaxBackoff:
			backoff = o.MinBackoff
		}
		s.log.Info("restarting the agent", "in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, o.MaxBackoff)
	}
	return nil
}

type supervisor struct {
	o   SuperviseOptions
	log *slog.Logger
}

// prepare settles the record before a start, while no agent runs.
func (s *supervisor) prepare() error {
	if _, err := os.Stat(s.o.Exe); errors.Is(err, os.ErrNotExist) {
		// Never made by this package (NAME is only ever replaced by
		// rename), but an operator may have moved it.
		if err := restoreOld(s.o.Exe); err != nil {
			return fmt.Errorf("agent binary %s is missing and cannot be restored: %w", s.o.Exe, err)
		}
		s.log.Error("agent binary was missing; restored the previous one", "exe", s.o.Exe)
	}
	rec, err := ReadRecord(s.o.DataDir)
	if err != nil || rec == nil {
		return err
	}
	switch rec.State {
	case StateRestored:
		if old, err := isOld(s.o.Exe); err == nil && !old {
			s.log.Warn("finishing an interrupted restore", "to", rec.From)
			return restoreOld(s.o.Exe)
		}
	case StateTrial:
		if old, err := isOld(s.o.Exe); err == nil && old {
			return nil // not swapped; the agent drops the record
		}
		if s.o.Now().After(rec.Deadline()) {
			return s.restore(rec, fmt.Sprintf("it did not connect and report healthy within its deadline (%s)", rec.Deadline().UTC().Format(time.RFC3339)))
		}
		rec.Starts++
		if rec.Starts > s.o.MaxStarts {
			return s.restore(rec, fmt.Sprintf("it was started %d times without reporting healthy", rec.Starts-1))
		}
		return WriteRecord(s.o.DataDir, rec)
	}
	return nil
}

// restore records the decision first, then puts the previous binary back
// (prepare re-does the second step if a kill comes between).
func (s *supervisor) restore(rec *Record, why string) error {
	s.log.Error("restoring the previous agent binary", "from", rec.To, "to", rec.From, "reason", why)
	next := *rec
	next.State, next.Reason = StateRestored, fmt.Sprintf("agent %s: %s", rec.To, why)
	if err := WriteRecord(s.o.DataDir, &next); err != nil {
		return err
	}
	return restoreOld(s.o.Exe)
}

// runOnce runs the agent until it exits or ctx ends, and reports whether
// it restored the previous binary.
func (s *supervisor) runOnce(ctx context.Context) (bool, error) {
	cmd := exec.Command(s.o.Exe, s.o.Args...)
	cmd.Stdout, cmd.Stderr = s.o.Stdout, s.o.Stderr
	cmd.Env = append(os.Environ(), SupervisorPIDEnv+"="+strconv.Itoa(os.Getpid()))
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		// The binary does not start at all (corrupt, wrong architecture):
		// as good as an exit.
		s.log.Error("agent does not start", "err", err)
		return s.exited(fmt.Sprintf("it does not start: %v", err))
	}
	s.log.Info("agent started", "pid", cmd.Process.Pid)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(s.o.Poll)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return s.exited(fmt.Sprintf("it exited (%v) before reporting healthy", exitText(err)))
		case <-ctx.Done():
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(s.o.StopTimeout):
				s.log.Warn("agent did not stop in time; killing it")
				cmd.Process.Kill()
				<-done
			}
			return false, nil
		case <-tick.C:
			rec, err := ReadRecord(s.o.DataDir)
			if err != nil || rec == nil || rec.State != StateTrial || !s.o.Now().After(rec.Deadline()) {
				continue
			}
			if old, err := isOld(s.o.Exe); err != nil || old {
				continue
			}
			s.log.Error("new agent version missed its deadline; stopping it", "version", rec.To, "deadline", rec.Deadline().UTC().Format(time.RFC3339))
			cmd.Process.Kill()
			<-done
			return true, s.restore(rec, fmt.Sprintf("it did not connect and report healthy within its deadline (%s)", rec.Deadline().Sub(time.UnixMilli(rec.SwappedUnixMs)).Round(time.Second)))
		}
	}
}

// exited handles an agent that exited by itself.
func (s *supervisor) exited(why string) (bool, error) {
	rec, err := ReadRecord(s.o.DataDir)
	if err != nil || rec == nil {
		return false, err
	}
	switch rec.State {
	case StateTrial:
		if old, err := isOld(s.o.Exe); err == nil && old {
			return false, nil
		}
		return true, s.restore(rec, why)
	case StateHealthy:
		rec.Exits++
		if rec.Exits >= s.o.MaxExits {
			return true, s.restore(rec, fmt.Sprintf("it exited %d times in its probation after reporting healthy", rec.Exits))
		}
		return false, WriteRecord(s.o.DataDir, rec)
	}
	return false, nil
}

func exitText(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ProcessState.String()
	}
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}
