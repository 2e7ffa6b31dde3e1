package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// child is a process the benchmarks start: a controller, an agent,
// Mosquitto. Unlike scripts/internal/proc's processes, a child dies with
// the benchmark (Pdeathsig) even when the benchmark is killed outright: a
// forgotten controller or simulator holding thousands of sockets would
// skew every later run on the machine.
type child struct {
	name string
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startChild runs bin with args, its output appended to logPath.
func startChild(name, logPath, bin string, args ...string) (*child, error) {
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		log.Close()
		close(c.done)
	}()
	return c, nil
}

// childAttr puts a child in its own process group (a Ctrl-C reaches the
// benchmark, which stops its children in order) and has it killed if the
// benchmark dies first.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// Pid returns the process id.
func (c *child) Pid() int { return c.cmd.Process.Pid }

// Exited reports whether the process has ended, and how.
func (c *child) Exited() (bool, error) {
	select {
	case <-c.done:
		return true, c.err
	default:
		return false, nil
	}
}

// Stop sends SIGTERM and waits up to grace before SIGKILL.
func (c *child) Stop(grace time.Duration) error {
	select {
	case <-c.done:
		return nil
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		var ee *exec.ExitError
		if errors.As(c.err, &ee) && ee.ExitCode() != 0 {
			return fmt.Errorf("%s exited with %v after SIGTERM (log %s)", c.name, c.err, c.Log)
		}
		return nil
	case <-time.After(grace):
		_ = c.cmd.Process.Kill()
		<-c.done
		return fmt.Errorf("%s did not stop within %s of SIGTERM and was killed (log %s)", c.name, grace, c.Log)
	}
}

// Kill sends SIGKILL and waits for the process to end.
func (c *child) Kill() {
	_ = c.cmd.Process.Kill()
	<-c.done
}

// WaitHTTP waits until url answers 200, the process exits, or ctx ends.
func (c *child) WaitHTTP(ctx context.Context, url string) error {
	hc := &http.Client{Timeout: time.Second}
	for {
		if done, err := c.Exited(); done {
			return fmt.Errorf("%s exited before it was ready (%v); see %s", c.name, err, c.Log)
		}
		if resp, err := hc.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready at %s: %w; see %s", c.name, url, ctx.Err(), c.Log)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
