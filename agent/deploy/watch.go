package deploy

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/models/host"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// HealthPolicy bounds a newly activated version: the agent's view of the
// SlotAssignment's pb.HealthPolicy, with its defaults filled in.
type HealthPolicy struct {
	// Watch is how long the version must stay within the bounds.
	Watch time.Duration
	// MaxErrorRate is the ceiling on the share of inferences that fail or
	// time out.
	MaxErrorRate float64
	// MaxLatencyP99 is the ceiling on the 99th percentile latency; 0 = none.
	MaxLatencyP99 time.Duration
	// MinInferences is how many inferences the error rate and latency
	// need before they are judged.
	MinInferences uint32
}

// DefaultHealthPolicy is what the agent watches when the assignment says
// nothing: a minute, at most 5% errors over at least 20 inferences, no
// latency bound (latency is relative to the hardware; the controller
// knows what to expect, the agent does not).
var DefaultHealthPolicy = HealthPolicy{Watch: time.Minute, MaxErrorRate: 0.05, MinInferences: 20}

// PolicyFrom fills p's unset fields from defaults. Zero means unset in
// proto3, so a controller that wants no error at all sets a tiny rate
// (1e-9), not 0.
func PolicyFrom(p *pb.HealthPolicy, defaults HealthPolicy) HealthPolicy {
	out := defaults
	if p == nil {
		return out
	}
	if p.GetWatchMs() > 0 {
		out.Watch = time.Duration(p.GetWatchMs()) * time.Millisecond
	}
	if r := p.GetMaxErrorRate(); r > 0 && !math.IsNaN(r) {
		out.MaxErrorRate = min(r, 1)
	}
	if p.GetMaxLatencyP99Ms() > 0 {
		out.MaxLatencyP99 = time.Duration(p.GetMaxLatencyP99Ms()) * time.Millisecond
	}
	if p.GetMinInferences() > 0 {
		out.MinInferences = p.GetMinInferences()
	}
	return out
}

// latency histogram: bucket i holds latencies up to latencyBase·growth^i,
// so a percentile read from it is at most 10% high. 200 buckets reach
// past half an hour, far beyond any inference deadline; longer calls
// count in the last bucket.
const (
	latencyBuckets = 200
	latencyBase    = 10 * time.Microsecond
	latencyGrowth  = 1.1
)

var bucketBounds = func() [latencyBuckets]time.Duration {
	var b [latencyBuckets]time.Duration
	v := float64(latencyBase)
	for i := range b {
		b[i] = time.Duration(v)
		v *= latencyGrowth
	}
	return b
}()

func bucketOf(d time.Duration) int {
	if d <= latencyBase {
		return 0
	}
	i := int(math.Ceil(math.Log(float64(d)/float64(latencyBase)) / math.Log(latencyGrowth)))
	i = min(max(i, 0), latencyBuckets-1)
	for i > 0 && bucketBounds[i-1] >= d { // float rounding at a bound
		i--
	}
	for i < latencyBuckets-1 && bucketBounds[i] < d {
		i++
	}
	return min(i, latencyBuckets-1)
}

// WatchCounts are the figures a health watch judges. They are persisted
// in state.json, so a restart mid-watch keeps them.
type WatchCounts struct {
	// Inferences counts the calls that reached the model, bad input
	// excepted (see Judge).
	Inferences uint64 `json:"inferences"`
	// Errors counts failed and timed-out calls among them.
	Errors uint64 `json:"errors"`
	// BadInput counts calls refused for bad input: the caller's fault,
	// reported but not judged.
	BadInput uint64 `json:"bad_input,omitempty"`
	// Latency is a histogram over bucketBounds (trailing zero buckets
	// trimmed).
	Latency []uint64 `json:"latency,omitempty"`
}

// Observe counts one call.
func (c *WatchCounts) Observe(took time.Duration, err error) {
	switch {
	case err == nil:
	case errors.Is(err, host.ErrBadInput):
		c.BadInput++
		return
	case !errors.Is(err, host.ErrTimeout) && (errors.Is(err, context.Canceled) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, host.ErrClosed)):
		// The caller went away or gave up first, or the agent closed the
		// model under it: none of it says anything about the model.
		return
	default:
		c.Errors++
	}
	c.Inferences++
	b := bucketOf(took)
	if len(c.Latency) <= b {
		c.Latency = append(c.Latency, make([]uint64, b+1-len(c.Latency))...)
	}
	c.Latency[b]++
}

// ErrorRate is Errors/Inferences (0 with no inferences).
func (c WatchCounts) ErrorRate() float64 {
	if c.Inferences == 0 {
		return 0
	}
	return float64(c.Errors) / float64(c.Inferences)
}

// Percentile returns the latency under which a share q of the calls
// finished (the upper bound of its histogram bucket); 0 with no calls.
func (c WatchCounts) Percentile(q float64) time.Duration {
	var total uint64
	for _, n := range c.Latency {
		total += n
	}
	if total == 0 {
		return 0
	}
	need := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i, n := range c.Latency {
		seen += n
		if seen >= need {
			return bucketBounds[i]
		}
	}
	return bucketBounds[len(c.Latency)-1]
}

// Verdict is what a health watch concludes.
type Verdict int

// The verdicts.
const (
	// Watching: not decided yet.
	Watching Verdict = iota
	// Healthy: the version stayed within the bounds for the watch.
	Healthy
	// Breached: the version broke a bound; roll it back.
	Breached
	// Extend: the watch ended with too few inferences to judge; watch
	// once more as long.
	Extend
)

func (v Verdict) String() string {
	switch v {
	case Watching:
		return "watching"
	case Healthy:
		return "healthy"
	case Breached:
		return "breached"
	case Extend:
		return "extend"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// Judge decides a watch from its counts: elapsed is the time since the
// watch began (or since its extension), over tells whether its time is up,
// extended whether it was extended already. It returns the verdict and
// the figures behind it, for the event an operator reads.
//
// Rules, in order:
//   - with at least MinInferences, an error rate over MaxErrorRate, or a
//     p99 latency over MaxLatencyP99, breaks the bounds at once;
//   - below MinInferences, so many errors that the rate must still be
//     over MaxErrorRate when MinInferences is reached break them too (2
//     errors in the first 2 calls of a 5%-of-20 policy);
//   - otherwise the version is healthy once its time is up with at least
//     MinInferences, or as soon as it reaches them after an extension;
//   - a watch whose time is up with fewer is extended once; after the
//     extension it is judged on what it has (no calls at all is healthy:
//     there is no evidence against the version).
//
// Calls refused for bad input are not judged: they say the caller is
// wrong, and would make any version look bad on a device with a broken
// app. Calls that time out are errors.
func (p HealthPolicy) Judge(c WatchCounts, over, extended bool) (Verdict, string) {
	n, e := c.Inferences, c.Errors
	rate := c.ErrorRate()
	p99 := c.Percentile(0.99)
	enough := n >= uint64(p.MinInferences)
	figures := func() string {
		s := fmt.Sprintf("error rate %.2f <= %.2f, p99 latency %s", rate, p.MaxErrorRate, round(p99))
		if p.MaxLatencyP99 > 0 {
			s += fmt.Sprintf(" <= %s", p.MaxLatencyP99)
		}
		return s + fmt.Sprintf(" over %d inferences", n)
	}
	judge := enough || (over && extended)
	if judge && n > 0 && rate > p.MaxErrorRate {
		return Breached, fmt.Sprintf("error rate %.2f > %.2f over %d inferences (%d failed)", rate, p.MaxErrorRate, n, e)
	}
	if !enough && float64(e) > p.MaxErrorRate*float64(p.MinInferences) {
		return Breached, fmt.Sprintf("error rate %.2f > %.2f over %d inferences (%d failed; more than %.0f%% of the %d needed to judge)",
			rate, p.MaxErrorRate, n, e, 100*p.MaxErrorRate, p.MinInferences)
	}
	if judge && n > 0 && p.MaxLatencyP99 > 0 && p99 > p.MaxLatencyP99 {
		return Breached, fmt.Sprintf("p99 latency %s > %s over %d inferences", round(p99), p.MaxLatencyP99, n)
	}
	switch {
	case over && enough:
		return Healthy, figures()
	case enough && extended:
		return Healthy, figures()
	case over && extended:
		if n == 0 {
			return Healthy, fmt.Sprintf("no inferences in %s; nothing against the version", 2*p.Watch)
		}
		return Healthy, figures() + fmt.Sprintf(" (fewer than the %d wanted, in %s)", p.MinInferences, 2*p.Watch)
	case over:
		return Extend, fmt.Sprintf("only %d of %d inferences after %s; watching %s more", n, p.MinInferences, p.Watch, p.Watch)
	}
	return Watching, ""
}

func round(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}

// watch is the health watch of a slot's active version.
type watch struct {
	policy   HealthPolicy
	started  time.Time
	deadline time.Time
	extended bool
	restarts int

	mu     sync.Mutex
	counts WatchCounts
	dirty  bool // counts changed since the last save
}

// observe counts one call and reports whether the watch may now be
// decided, so the health loop looks at once rather than at the deadline.
func (w *watch) observe(took time.Duration, err error) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.counts.Observe(took, err)
	w.dirty = true
	v, _ := w.policy.Judge(w.counts, false, w.extended)
	return v != Watching
}

func (w *watch) snapshot() WatchCounts {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.counts
	c.Latency = append([]uint64(nil), c.Latency...)
	return c
}

// record is the watch as state.json keeps it.
func (w *watch) record(clean bool) *WatchRecord {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.dirty = false
	c := w.counts
	c.Latency = append([]uint64(nil), c.Latency...)
	return &WatchRecord{
		Policy:         w.policy.record(),
		StartedUnixMs:  w.started.UnixMilli(),
		DeadlineUnixMs: w.deadline.UnixMilli(),
		Extended:       w.extended,
		Restarts:       w.restarts,
		Clean:          clean,
		Counts:         c,
	}
}

func (p HealthPolicy) record() PolicyRecord {
	return PolicyRecord{WatchMs: p.Watch.Milliseconds(), MaxErrorRate: p.MaxErrorRate,
		MaxLatencyP99Ms: p.MaxLatencyP99.Milliseconds(), MinInferences: p.MinInferences}
}

func (r PolicyRecord) policy() HealthPolicy {
	return HealthPolicy{Watch: time.Duration(r.WatchMs) * time.Millisecond, MaxErrorRate: r.MaxErrorRate,
		MaxLatencyP99: time.Duration(r.MaxLatencyP99Ms) * time.Millisecond, MinInferences: r.MinInferences}
}

func watchFromRecord(r *WatchRecord) *watch {
	c := r.Counts
	if len(c.Latency) > latencyBuckets {
		c.Latency = c.Latency[:latencyBuckets]
	}
	return &watch{
		policy:   r.Policy.policy(),
		started:  time.UnixMilli(r.StartedUnixMs),
		deadline: time.UnixMilli(r.DeadlineUnixMs),
		extended: r.Extended,
		restarts: r.Restarts,
		counts:   c,
	}
}
