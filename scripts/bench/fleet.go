package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// defaultSimDevices is how many simulated devices one `fleet sim` process
// runs by default (-sim-devices), and so how many join at once (see
// joinFleet). Fewer, larger processes cost less CPU when idle: a joined,
// idle fleet of 10,000 took 8.3 s of CPU a 30 s in five processes of
// 2,000, 6.2 s in two of 5,000 and 5.0 s in one (load average 11 to 17).
// But on two cores shared with other work, a larger process runs longer
// queues of goroutines on its two threads: in a 10,000-device rollout at
// load average 25 to 35, two processes of 5,000 had 663 devices drop
// their broker connection (a ping or write past its timeout) and 943
// downloads cut (the controller closes a connection whose request has
// not come in 10 s), against 93 and 5 with five processes of 2,000. Each
// device also holds its broker connection, and while a wave downloads an
// HTTP connection and a file, against a limit on open files of 20,000 on
// the machine these benchmarks were written on.
const defaultSimDevices = 2000

// simFleet is the simulated fleet of a benchmark: one or more `fleet sim`
// processes, read as one.
type simFleet struct {
	procs []*simProc
	// cpuProfiles are the processes' --cpuprofile files, when profiled.
	cpuProfiles []string
}

// joinFleet starts n simulated devices against c in processes of at most
// -sim-devices, one process after the other: each starts its devices at
// the -join-rate, and the next starts once the controller lists every
// device of this one online. The pacing is needed: a device says hello,
// reports its state and its presence as it connects, and the controller
// handles these one at a time (a store commit each). When they arrive
// faster, the broker holds them for the controller's session up to its
// in-flight limit (mochi: 8,192 messages; Mosquitto: max_queued_messages)
// and drops the rest, and the controller never hears of those devices
// until they reconnect. Each process has its own id prefix, seed and
// chunk label, so the bench can ask the controller about its devices.
// The fleet is returned also on error, to be stopped.
func (e *env) joinFleet(ctx context.Context, c *ctl, n int, profiled bool) (*simFleet, error) {
	k := (n + e.cfg.simDevices - 1) / e.cfg.simDevices
	f := &simFleet{}
	for i := range k {
		size := n / k
		if i < n%k {
			size++
		}
		chunk := fmt.Sprintf("c%02d", i+1)
		args := []string{"--prefix", "sim" + chunk + "-", "--seed", fmt.Sprint(i + 1),
			"--start-rate", fmt.Sprint(e.cfg.joinRate), "--labels", "fleet=bench;chunk=" + chunk + ";" + simLabels}
		if profiled {
			prof := filepath.Join(e.dir("simprofile"), "cpu.prof")
			f.cpuProfiles = append(f.cpuProfiles, prof)
			args = append(args, "--cpuprofile", prof)
		}
		p, err := e.startSim(ctx, c, size, args...)
		if err != nil {
			return f, err
		}
		f.procs = append(f.procs, p)
		timeout := 2*time.Minute + time.Duration(size)*time.Second/time.Duration(e.cfg.joinRate)
		if _, err := p.wait(ctx, timeout, "its devices to join", func(st simStatus) bool { return st.Joined == size }); err != nil {
			return f, err
		}
		if err := c.waitOnline(ctx, "fleet=bench,chunk="+chunk, size, timeout); err != nil {
			return f, err
		}
		e.log.Info("joined", "devices", size, "chunk", chunk, "of", k)
	}
	return f, nil
}

// status adds up the processes' last reports.
func (f *simFleet) status() simStatus {
	var t simStatus
	t.Running = map[string]int{}
	for i, p := range f.procs {
		s := p.status()
		if i == 0 || s.UpSeconds < t.UpSeconds {
			t.UpSeconds = s.UpSeconds
		}
		t.Agents += s.Agents
		t.Powered += s.Powered
		t.Online += s.Online
		t.Connected += s.Connected
		t.Joined += s.Joined
		t.Failing += s.Failing
		t.Connects += s.Connects
		t.Published += s.Published
		t.Received += s.Received
		t.Inferences += s.Inferences
		t.InferenceErrors += s.InferenceErrors
		t.ModelLoads += s.ModelLoads
		t.ModelsLoaded = max(t.ModelsLoaded, s.ModelsLoaded)
		for k, v := range s.Running {
			t.Running[k] += v
		}
	}
	return t
}

// wait waits until cond holds for the fleet's counters, or timeout.
func (f *simFleet) wait(ctx context.Context, timeout time.Duration, what string, cond func(simStatus) bool) (simStatus, error) {
	deadline := time.Now().Add(timeout)
	for {
		st := f.status()
		if cond(st) {
			return st, nil
		}
		for _, p := range f.procs {
			select {
			case <-p.done:
				return st, fmt.Errorf("fleet sim exited (%v) while waiting for %s; see %s", p.err, what, p.log)
			default:
			}
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("timed out after %s waiting for %s; the fleet stood at %s; see %s", timeout, what, st.brief(), f.logs())
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// cpu is the processes' CPU time (user+system), added up.
func (f *simFleet) cpu() time.Duration {
	var total time.Duration
	for _, p := range f.procs {
		t, _ := cpuTime(p.pid())
		total += t
	}
	return total
}

// memory is the processes' resident memory, added up.
func (f *simFleet) memory() int64 {
	var total int64
	for _, p := range f.procs {
		rss, _, err := memory(p.pid())
		if err != nil {
			return 0
		}
		total += rss
	}
	return total
}

func (f *simFleet) logs() string {
	var l []string
	for _, p := range f.procs {
		l = append(l, p.log)
	}
	return strings.Join(l, ", ")
}

// stop stops every process, all at once.
func (f *simFleet) stop() {
	for _, p := range f.procs {
		_ = p.cmd.Process.Signal(interruptSignal)
	}
	for _, p := range f.procs {
		p.stop()
	}
}

// brief is a one-line account of the fleet's counters.
func (s simStatus) brief() string {
	return fmt.Sprintf("%d devices, %d joined, %d connected, running %v", s.Agents, s.Joined, s.Connected, s.Running)
}
