package deploy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/host"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func counts(n, errs int, lat time.Duration) WatchCounts {
	var c WatchCounts
	for i := range n {
		var err error
		if i < errs {
			err = fmt.Errorf("boom: %w", host.ErrGuest)
		}
		c.Observe(lat, err)
	}
	return c
}

func TestJudge(t *testing.T) {
	p := HealthPolicy{Watch: time.Minute, MaxErrorRate: 0.05, MinInferences: 20, MaxLatencyP99: 10 * time.Millisecond}
	fast, slow := time.Millisecond, 30*time.Millisecond
	cases := []struct {
		name           string
		c              WatchCounts
		over, extended bool
		want           Verdict
		figures        string
	}{
		{"nothing yet", WatchCounts{}, false, false, Watching, ""},
		{"enough, in time, no errors", counts(50, 0, fast), false, false, Watching, ""},
		{"enough at the deadline", counts(50, 1, fast), true, false, Healthy, "error rate 0.02 <= 0.05, p99 latency 1.07ms <= 10ms over 50 inferences"},
		{"error rate over", counts(120, 37, fast), false, false, Breached, "error rate 0.31 > 0.05 over 120 inferences (37 failed)"},
		{"error rate exactly at the bound", counts(20, 1, fast), true, false, Healthy, "error rate 0.05"},
		{"too many errors before the minimum", counts(3, 2, fast), false, false, Breached, "error rate 0.67 > 0.05 over 3 inferences (2 failed; more than 5% of the 20"},
		{"one error before the minimum", counts(3, 1, fast), false, false, Watching, ""},
		{"latency over", counts(100, 0, slow), false, false, Breached, "p99 latency 32.99ms > 10ms over 100 inferences"},
		{"latency not judged below the minimum", counts(5, 0, slow), false, false, Watching, ""},
		{"too few at the deadline", counts(5, 0, fast), true, false, Extend, "only 5 of 20 inferences"},
		{"minimum reached in the extension", counts(20, 0, fast), false, true, Healthy, "over 20 inferences"},
		{"too few after the extension", counts(5, 0, fast), true, true, Healthy, "fewer than the 20 wanted"},
		{"too few after the extension, judged", counts(5, 1, fast), true, true, Breached, "error rate 0.20 > 0.05 over 5 inferences"},
		{"none at all", WatchCounts{}, true, true, Healthy, "no inferences in 2m0s"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v, why := p.Judge(c.c, c.over, c.extended)
			if v != c.want || !strings.Contains(why, c.figures) {
				t.Fatalf("Judge = %s %q, want %s containing %q", v, why, c.want, c.figures)
			}
		})
	}
}

func TestObserveSkipsWhatIsNotTheModels(t *testing.T) {
	var c WatchCounts
	c.Observe(time.Millisecond, fmt.Errorf("x: %w", host.ErrBadInput))
	c.Observe(time.Millisecond, context.Canceled)
	c.Observe(time.Millisecond, fmt.Errorf("waiting: %w", context.DeadlineExceeded))
	c.Observe(time.Millisecond, fmt.Errorf("%w: closed", host.ErrClosed))
	if c.Inferences != 0 || c.BadInput != 1 {
		t.Fatalf("counts %+v: caller errors counted against the model", c)
	}
	c.Observe(time.Second, fmt.Errorf("%w: stopped: %w", host.ErrTimeout, context.DeadlineExceeded))
	c.Observe(time.Millisecond, errors.New("trap"))
	c.Observe(time.Millisecond, nil)
	if c.Inferences != 3 || c.Errors != 2 {
		t.Fatalf("counts %+v, want 3 inferences and 2 errors", c)
	}
}

func TestPercentile(t *testing.T) {
	var c WatchCounts
	if c.Percentile(0.99) != 0 {
		t.Fatal("percentile of nothing")
	}
	for i := 1; i <= 1000; i++ {
		c.Observe(time.Duration(i)*time.Microsecond*10, nil) // 10µs .. 10ms
	}
	for _, q := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 5 * time.Millisecond}, {0.99, 9900 * time.Microsecond}, {1, 10 * time.Millisecond}} {
		got := c.Percentile(q.q)
		if got < q.want || float64(got) > 1.1*float64(q.want) {
			t.Errorf("p%v = %s, want %s to 10%% over", q.q*100, got, q.want)
		}
	}
	for _, d := range []time.Duration{0, time.Nanosecond, latencyBase, latencyBase + 1, time.Second, 1000 * time.Hour} {
		b := bucketOf(d)
		if bucketBounds[b] < d && b != latencyBuckets-1 || b > 0 && bucketBounds[b-1] >= d {
			t.Errorf("bucketOf(%s) = %d, bounds %s..%s", d, b, bucketBounds[max(b-1, 0)], bucketBounds[b])
		}
	}
}

func TestPolicyFrom(t *testing.T) {
	def := DefaultHealthPolicy
	if got := PolicyFrom(nil, def); got != def {
		t.Fatalf("nil policy = %+v", got)
	}
	got := PolicyFrom(&pb.HealthPolicy{WatchMs: 1500, MaxErrorRate: 2, MaxLatencyP99Ms: 30}, def)
	want := HealthPolicy{Watch: 1500 * time.Millisecond, MaxErrorRate: 1, MaxLatencyP99: 30 * time.Millisecond, MinInferences: def.MinInferences}
	if got != want {
		t.Fatalf("PolicyFrom = %+v, want %+v", got, want)
	}
}
