// Package memtrim gives memory an idle agent process is not using back to
// the operating system: the Go heap's free pages, and the pages of the
// agent's own binary that start-up and model compiles touched but idle
// serving does not run.
//
// The binary's pages are most of an idle agent's resident memory. The
// kernel maps a file's pages in batches around each page fault
// (fault-around: 64 KiB, or a whole large folio), so code that runs once
// (package initialisation, SQLite's schema set-up, wazero's compiler, the
// TLS handshake) leaves nearly the whole file mapped: 15.5 of the 17 MiB
// of fleet-agent, measured 2026-11-27 (BENCHMARKS.md, issue 9). Mapped
// executable pages also count in the process's resident memory and are the
// last the kernel reclaims. Release unmaps them (madvise MADV_DONTNEED on
// the binary's read-only mappings); what runs again faults back in from
// the page cache, where the pages stay, shared and reclaimable. The cost
// is those minor faults, and one garbage collection for the heap.
//
// A Trimmer calls Release once the process has been quiet for a while
// after work, so an agent that serves without pause never trims, and one
// that idles trims once per burst of work.
package memtrim

import (
	"context"
	"log/slog"
	"runtime/debug"
	"sync/atomic"
	"time"
)

// Release returns the heap's free pages to the operating system and, on
// Linux, unmaps this binary's read-only mappings (code and read-only
// data; never its writable data). It returns how many bytes of the binary
// were unmapped. Pages in use fault back in when next touched.
//
// Under a debugger, Release also drops the breakpoints written into the
// code, which live in private copies of the code's pages; run with
// --trim-after 0 to debug.
func Release() (unmapped int64, err error) {
	debug.FreeOSMemory()
	return releaseBinary()
}

// Trimmer calls Release once the process has been quiet for a while after
// work. Busy reports work; Run trims. A nil *Trimmer does nothing.
type Trimmer struct {
	quiet   time.Duration
	log     *slog.Logger
	release func() (int64, error)
	last    atomic.Int64 // UnixNano of the last Busy
	wake    chan struct{}
	trims   atomic.Uint64
}

// New returns a Trimmer that trims once quiet has passed without work
// since the last work, or nil when quiet is not positive (trimming off).
func New(quiet time.Duration, log *slog.Logger) *Trimmer {
	if quiet <= 0 {
		return nil
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Trimmer{quiet: quiet, log: log, release: Release, wake: make(chan struct{}, 1)}
}

// Busy records work: the next trim waits until the process has been quiet
// for the Trimmer's quiet time after it. It never blocks, and is cheap
// enough to call on every inference.
func (t *Trimmer) Busy() {
	if t == nil {
		return
	}
	t.last.Store(time.Now().UnixNano())
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// Trims returns how many times the Trimmer has released memory.
func (t *Trimmer) Trims() uint64 {
	if t == nil {
		return 0
	}
	return t.trims.Load()
}

// Run trims after every burst of work until ctx ends. Start-up counts as
// work: the first trim comes once the process has settled after it.
func (t *Trimmer) Run(ctx context.Context) error {
	if t == nil {
		return nil
	}
	t.Busy()
	var covered int64 // the last work a trim came after
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.wake:
		}
		for {
			last := t.last.Load()
			if last <= covered {
				break // a wake-up for work a trim already followed
			}
			if wait := time.Until(time.Unix(0, last).Add(t.quiet)); wait > 0 {
				timer := time.NewTimer(wait)
				select {
				case <-ctx.Done():
					timer.Stop()
					return nil
				case <-timer.C:
				}
				continue
			}
			covered = last
			unmapped, err := t.release()
			t.trims.Add(1)
			if err != nil {
				t.log.Debug("memory trim: the binary's pages stay mapped", "err", err)
			} else {
				t.log.Debug("memory trimmed", "binary_unmapped_bytes", unmapped)
			}
			break
		}
	}
}
