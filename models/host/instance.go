package host

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/sys"

	"github.com/edgefleet/edgefleet/models/tensor"
)

// ABI return codes (models/ABI.md).
const (
	codeBadInput       = -1
	codeOutputTooSmall = -2
)

const (
	// minBuffer is the smallest buffer the host asks ef_alloc for.
	minBuffer = 4 << 10
	// initialOut is the first output buffer size; most models answer in
	// far less, and a larger answer costs one retry.
	initialOut = 64 << 10
	// maxMetadata caps what ef_metadata may return.
	maxMetadata = 1 << 20
	// maxMessage caps a guest error message kept in an error.
	maxMessage = 4 << 10
)

// instance is one instantiated module. It is used by one goroutine at a
// time (the pool guarantees it). Once broken (trap, timeout, bad pointer)
// it must be closed, never reused.
type instance struct {
	mod                                         api.Module
	mem                                         api.Memory
	abiVersion, alloc, inferFn, lastErr, metaFn api.Function

	stack []uint64
	frame []byte // host-side encoding buffer, reused
	dog   *watchdog

	inPtr, inCap   uint32
	outPtr, outCap uint32

	broken bool
	// trace is the full error of the call that broke the instance, with
	// wazero's wasm stack trace, for the log; errors carry its first line.
	trace string
}

func newInstance(mod api.Module) *instance {
	return &instance{
		mod:        mod,
		mem:        mod.ExportedMemory("memory"),
		abiVersion: mod.ExportedFunction("ef_abi_version"),
		alloc:      mod.ExportedFunction("ef_alloc"),
		inferFn:    mod.ExportedFunction("ef_infer"),
		lastErr:    mod.ExportedFunction("ef_last_error"),
		metaFn:     mod.ExportedFunction("ef_metadata"),
		stack:      make([]uint64, 4),
		dog:        newWatchdog(),
	}
}

func (i *instance) close(ctx context.Context) {
	i.dog.timer.Stop()
	_ = i.mod.Close(context.WithoutCancel(ctx))
}

// memoryBytes is the current size of the instance's linear memory, 0 if it
// exports none.
func (i *instance) memoryBytes() uint64 {
	if i.mem == nil {
		return 0
	}
	return uint64(i.mem.Size())
}

// call invokes f with i32 parameters, stopped at deadline (or when ctx
// ends), and returns its i32 result. Any error breaks the instance: wazero
// has closed it (deadline) or its state is unknown (trap).
func (i *instance) call(ctx context.Context, deadline time.Time, f api.Function, params ...uint32) (int32, error) {
	d := time.Until(deadline)
	if d <= 0 {
		return 0, fmt.Errorf("%w: no time left before its deadline: %w", ErrTimeout, context.DeadlineExceeded)
	}
	select {
	case <-ctx.Done():
		if err := ctx.Err(); errors.Is(err, context.DeadlineExceeded) {
			return 0, fmt.Errorf("%w: the caller's deadline passed: %w", ErrTimeout, err)
		}
		return 0, fmt.Errorf("call canceled: %w", ctx.Err())
	default:
	}
	for k, p := range params {
		i.stack[k] = api.EncodeU32(p)
	}
	wctx := i.dog.arm(ctx, deadline, d)
	err := f.CallWithStack(wctx, i.stack)
	if !i.dog.disarm() {
		// The deadline (or ctx) fired, if only just after the call
		// returned: wazero may have closed the module, and the watchdog's
		// channel is spent. Either way the instance is not reused.
		i.broken = true
		if err == nil {
			i.trace = "the deadline fired as the call returned"
		}
	}
	if err != nil {
		i.broken = true
		i.trace = err.Error()
		return 0, classify(i.dog, err)
	}
	return api.DecodeI32(i.stack[0]), nil
}

// watchdog is the context of an instance's guest calls. wazero stops a
// call (WithCloseOnContextDone) when its context is done; a fresh
// context.WithTimeout per call would cost a timer, a channel and a few
// allocations on every inference, a large share of the host's overhead,
// and so would a context.AfterFunc hooking the caller's cancellation. The
// watchdog instead keeps one timer and one channel for the life of the
// instance, re-armed for each call; when the caller's context can be
// canceled, the timer also wakes every pollEvery to look at it. Once the
// watchdog has fired the instance is discarded, so the channel never needs
// to be reopened.
type watchdog struct {
	done  chan struct{}
	once  sync.Once
	err   error // set once, before done is closed
	timer *time.Timer

	mu       sync.Mutex // guards what tick reads
	armed    bool
	parent   context.Context
	deadline time.Time
}

// pollEvery is how often a call watches its caller's context for a
// cancellation: the longest a canceled call goes on.
const pollEvery = 10 * time.Millisecond

func newWatchdog() *watchdog {
	w := &watchdog{done: make(chan struct{}), parent: context.Background()}
	w.timer = time.AfterFunc(time.Hour, w.tick)
	w.timer.Stop()
	return w
}

// arm starts watching one call ending at deadline, d from now, or when
// ctx ends.
func (w *watchdog) arm(ctx context.Context, deadline time.Time, d time.Duration) context.Context {
	if pd, ok := ctx.Deadline(); ok && pd.Before(deadline) {
		d -= deadline.Sub(pd)
		deadline = pd
	}
	w.mu.Lock()
	w.armed, w.parent, w.deadline = true, ctx, deadline
	w.mu.Unlock()
	if ctx.Done() != nil {
		d = min(d, pollEvery)
	}
	w.timer.Reset(d)
	return w
}

// tick runs on the timer: it fires at the deadline or once the caller's
// context is done, else waits some more.
func (w *watchdog) tick() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.armed {
		return // the call ended as the timer went off
	}
	if err := w.parent.Err(); err != nil {
		w.fire(err)
		return
	}
	left := time.Until(w.deadline)
	if left <= 0 {
		w.fire(context.DeadlineExceeded)
		return
	}
	if w.parent.Done() != nil {
		left = min(left, pollEvery)
	}
	w.timer.Reset(left)
}

// disarm ends the watch of a call and reports whether it had not fired.
func (w *watchdog) disarm() bool {
	w.mu.Lock()
	w.armed, w.parent = false, context.Background()
	w.mu.Unlock()
	w.timer.Stop()
	select {
	case <-w.done:
		return false
	default:
		return true
	}
}

func (w *watchdog) fire(err error) {
	w.once.Do(func() {
		w.err = err
		close(w.done)
	})
}

// Deadline implements context.Context.
func (w *watchdog) Deadline() (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.deadline, true
}

// Done implements context.Context.
func (w *watchdog) Done() <-chan struct{} { return w.done }

// Err implements context.Context.
func (w *watchdog) Err() error {
	select {
	case <-w.done:
		return w.err
	default:
		return nil
	}
}

// Value implements context.Context with the caller's values. Only the
// goroutine making the call asks, and only that goroutine changes parent,
// so it needs no lock.
func (w *watchdog) Value(key any) any { return w.parent.Value(key) }

func classify(ctx context.Context, err error) error {
	var ee *sys.ExitError
	if errors.As(err, &ee) {
		switch ee.ExitCode() {
		case sys.ExitCodeDeadlineExceeded:
			return fmt.Errorf("%w: stopped at its deadline: %w", ErrTimeout, context.DeadlineExceeded)
		case sys.ExitCodeContextCanceled:
			return fmt.Errorf("call canceled: %w", context.Canceled)
		}
		return fmt.Errorf("%w: module exited with code %d", ErrTrap, ee.ExitCode())
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w: stopped at its deadline: %w", ErrTimeout, context.DeadlineExceeded)
	}
	msg, _, _ := strings.Cut(err.Error(), "\n")
	return fmt.Errorf("%w: %s", ErrTrap, msg)
}

// ensure makes the buffer (*ptr, *capacity) hold at least need bytes,
// asking the guest for a new one at least twice the old size, so that
// repeated growth wastes at most half the guest's allocations.
func (i *instance) ensure(ctx context.Context, deadline time.Time, ptr, capacity *uint32, need int) error {
	if uint64(need) <= uint64(*capacity) && *ptr != 0 {
		return nil
	}
	size := max(need, 2*int(*capacity), minBuffer)
	if size > tensor.MaxFrame+minBuffer {
		size = max(need, tensor.MaxFrame)
	}
	p, err := i.call(ctx, deadline, i.alloc, uint32(size))
	if err != nil {
		return fmt.Errorf("ef_alloc(%d): %w", size, err)
	}
	if p == 0 {
		i.broken = true
		return fmt.Errorf("%w: ef_alloc(%d) returned 0: the module is out of memory; raise limits.memoryPages or send smaller inputs", ErrTrap, size)
	}
	if uint64(uint32(p))+uint64(size) > uint64(i.mem.Size()) {
		i.broken = true
		return fmt.Errorf("%w: ef_alloc(%d) returned %#x, outside the module's %d bytes of memory", ErrGuest, size, uint32(p), i.mem.Size())
	}
	*ptr, *capacity = uint32(p), uint32(size)
	return nil
}

// infer runs one inference, with every guest call it takes (allocation,
// retries, error message) stopped at timeout from now.
func (i *instance) infer(ctx context.Context, in []tensor.Tensor, timeout time.Duration) ([]tensor.Tensor, error) {
	deadline := time.Now().Add(timeout)
	frame, err := tensor.AppendFrame(i.frame[:0], in)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	i.frame = frame
	if err := i.ensure(ctx, deadline, &i.inPtr, &i.inCap, len(frame)); err != nil {
		return nil, err
	}
	if i.outCap == 0 {
		if err := i.ensure(ctx, deadline, &i.outPtr, &i.outCap, max(initialOut, len(frame))); err != nil {
			return nil, err
		}
	}
	if !i.mem.Write(i.inPtr, frame) {
		i.broken = true
		return nil, fmt.Errorf("%w: input buffer at %#x is outside memory", ErrGuest, i.inPtr)
	}
	// A too-small output buffer costs a retry; the guest's hint makes one
	// retry enough, the bound stops a guest that keeps asking for more.
	for attempt := 0; attempt < 4; attempt++ {
		n, err := i.call(ctx, deadline, i.inferFn, i.inPtr, uint32(len(frame)), i.outPtr, i.outCap)
		if err != nil {
			return nil, fmt.Errorf("ef_infer: %w", err)
		}
		switch {
		case n >= 0:
			if uint32(n) > i.outCap {
				i.broken = true
				return nil, fmt.Errorf("%w: ef_infer returned length %d for a %d byte buffer", ErrGuest, n, i.outCap)
			}
			view, ok := i.mem.Read(i.outPtr, uint32(n))
			if !ok {
				i.broken = true
				return nil, fmt.Errorf("%w: output buffer at %#x is outside memory", ErrGuest, i.outPtr)
			}
			// Copy: the view aliases guest memory, which the next call reuses.
			out, err := tensor.DecodeFrame(append([]byte(nil), view...))
			if err != nil {
				return nil, fmt.Errorf("%w: output frame: %w", ErrGuest, err)
			}
			return out, nil
		case n == codeOutputTooSmall:
			need := 2 * int(i.outCap)
			if i.outCap >= 4 {
				if b, ok := i.mem.Read(i.outPtr, 4); ok {
					if hint := int(binary.LittleEndian.Uint32(b)); hint > int(i.outCap) {
						need = hint
					}
				}
			}
			if need > tensor.MaxFrame {
				return nil, fmt.Errorf("%w: output frame needs %d bytes, over the %d byte limit", ErrGuest, need, tensor.MaxFrame)
			}
			if err := i.ensure(ctx, deadline, &i.outPtr, &i.outCap, need); err != nil {
				return nil, err
			}
		case n == codeBadInput:
			return nil, fmt.Errorf("%w: %s", ErrBadInput, i.message(ctx, deadline))
		default:
			return nil, fmt.Errorf("%w: code %d: %s", ErrGuest, n, i.message(ctx, deadline))
		}
	}
	return nil, fmt.Errorf("%w: ef_infer kept asking for a larger output buffer", ErrGuest)
}

// message fetches the guest's last error message, best effort.
func (i *instance) message(ctx context.Context, deadline time.Time) string {
	n, err := i.call(ctx, deadline, i.lastErr, i.outPtr, i.outCap)
	if err != nil {
		return fmt.Sprintf("(no message: ef_last_error: %v)", err)
	}
	if n <= 0 {
		return "(no message)"
	}
	n = min(n, int32(i.outCap), maxMessage)
	b, ok := i.mem.Read(i.outPtr, uint32(n))
	if !ok {
		return "(no message)"
	}
	return string(b)
}

// metadata calls ef_metadata, growing the buffer as asked.
func (i *instance) metadata(ctx context.Context) ([]byte, error) {
	deadline := time.Now().Add(instantiateTimeout)
	if err := i.ensure(ctx, deadline, &i.outPtr, &i.outCap, initialOut); err != nil {
		return nil, err
	}
	for {
		n, err := i.call(ctx, deadline, i.metaFn, i.outPtr, i.outCap)
		if err != nil {
			return nil, err
		}
		if n >= 0 {
			if uint32(n) > i.outCap {
				return nil, fmt.Errorf("returned length %d for a %d byte buffer", n, i.outCap)
			}
			b, ok := i.mem.Read(i.outPtr, uint32(n))
			if !ok {
				return nil, errors.New("buffer outside memory")
			}
			return append([]byte(nil), b...), nil
		}
		if n != codeOutputTooSmall || i.outCap >= maxMetadata {
			return nil, fmt.Errorf("code %d: %s", n, i.message(ctx, deadline))
		}
		if err := i.ensure(ctx, deadline, &i.outPtr, &i.outCap, 2*int(i.outCap)); err != nil {
			return nil, err
		}
	}
}
