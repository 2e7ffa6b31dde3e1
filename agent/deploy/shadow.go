package deploy

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// ShadowPolicy asks for a shadow phase before a new version is switched
// in: the candidate is loaded beside the active version and gets a copy
// of live inputs; its answers are compared with the active one's and
// never returned to callers.
//
// A desired state asks for one with SlotAssignment.shadow
// (ShadowPolicyFrom); Options.Shadow, from the agent's configuration,
// fills what it leaves unset, and decides alone for assignments without
// one.
type ShadowPolicy struct {
	// MinInferences is how many compared inferences the candidate needs
	// before it is judged (default 100).
	MinInferences uint32
	// MaxDuration ends a shadow phase that lacks traffic: the candidate is
	// then judged on what there is; none at all switches it in (default
	// 10 minutes).
	MaxDuration time.Duration
	// MinAgreement is the share of compared inferences whose answers must
	// agree for the switch (default 0.98); below it the candidate is
	// refused for the generation.
	MinAgreement float64
	// Tolerance is how far apart two scores that are not class scores may
	// be and still agree, relative to max(1, |active's|) (default 0.05).
	Tolerance float64
	// Hold keeps the candidate in shadow, unjudged, until a desired state
	// assigns it without a shadow phase (the controller judges from the
	// reported figures and switches a whole wave at once).
	Hold bool
}

func (p ShadowPolicy) withDefaults() ShadowPolicy {
	if p.MinInferences == 0 {
		p.MinInferences = 100
	}
	if p.MaxDuration <= 0 {
		p.MaxDuration = 10 * time.Minute
	}
	if !(p.MinAgreement > 0) || p.MinAgreement > 1 {
		p.MinAgreement = 0.98
	}
	if !(p.Tolerance > 0) {
		p.Tolerance = 0.05
	}
	return p
}

// ShadowStats are a candidate's figures against the active version.
type ShadowStats struct {
	// Candidate is the version in shadow; Active the one it is compared with.
	Candidate, Active Ref
	Since             time.Time
	// Offered counts inputs copied to the candidate; Skipped those it was
	// too busy for (shadowing never slows the live path).
	Offered, Skipped uint64
	// Compared counts inferences both versions answered; Agreed those whose
	// every output row agreed (same class, or scores within tolerance).
	Compared, Agreed uint64
	// Errors counts the candidate's failed calls where the active version
	// answered.
	Errors uint64
	// MaxScoreDiff and MeanScoreDiff are over every numeric output element.
	MaxScoreDiff, MeanScoreDiff float64
	// CandidateP50, CandidateP99 and ActiveP99 are latencies.
	CandidateP50, CandidateP99, ActiveP99 time.Duration
}

// Agreement is Agreed/Compared, 1 with nothing compared.
func (s ShadowStats) Agreement() float64 {
	if s.Compared == 0 {
		return 1
	}
	return float64(s.Agreed) / float64(s.Compared)
}

// FlipRate is 1 - Agreement: the share of answers the switch would change.
func (s ShadowStats) FlipRate() float64 { return 1 - s.Agreement() }

// String gives the figures as an event's detail shows them.
func (s ShadowStats) String() string {
	return fmt.Sprintf("shadow agreement %.3f over %d inferences (%d errors, max score difference %.4g, mean %.4g; candidate p99 latency %s, active %s)",
		s.Agreement(), s.Compared, s.Errors, s.MaxScoreDiff, s.MeanScoreDiff, round(s.CandidateP99), round(s.ActiveP99))
}

// Comparison is how one pair of answers compares.
type Comparison struct {
	// Agree: every output row has the same class (or score within
	// tolerance) in both answers.
	Agree bool
	// MaxDiff and SumDiff are over the Elements numeric elements compared.
	MaxDiff, SumDiff float64
	Elements         int
}

// Compare compares a candidate's outputs with the active version's, output
// by output (matched by name). A row agrees when:
//   - class scores (float outputs whose last dimension is 2 or more):
//     both pick the same class (argmax);
//   - one float score per row with both values in [0, 1]: both fall on the
//     same side of 0.5 (the usual decision threshold);
//   - other floats: |a - b| <= tol · max(1, |a|);
//   - integers and booleans: equal.
//
// Missing outputs, or shapes or datatypes that differ, disagree.
func Compare(active, cand []tensor.Tensor, tol float64) Comparison {
	c := Comparison{Agree: len(active) == len(cand)}
	for _, a := range active {
		var b *tensor.Tensor
		for i := range cand {
			if cand[i].Name == a.Name {
				b = &cand[i]
				break
			}
		}
		if b == nil || b.DType != a.DType || !sameShape(a.Shape, b.Shape) {
			c.Agree = false
			continue
		}
		if !compareTensor(&c, a, *b, tol) {
			c.Agree = false
		}
	}
	return c
}

func sameShape(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func isFloat(d tensor.DType) bool { return d == tensor.FP16 || d == tensor.FP32 || d == tensor.FP64 }

func compareTensor(c *Comparison, a, b tensor.Tensor, tol float64) bool {
	av, err1 := a.Float64s()
	bv, err2 := b.Float64s()
	if err1 != nil || err2 != nil || len(av) != len(bv) {
		return string(a.Data) == string(b.Data)
	}
	agree := true
	for i := range av {
		d := math.Abs(av[i] - bv[i])
		if math.IsNaN(d) {
			d = math.Inf(1)
		}
		c.MaxDiff = max(c.MaxDiff, d)
		if !math.IsInf(d, 0) {
			c.SumDiff += d
		}
		c.Elements++
	}
	if !isFloat(a.DType) {
		for i := range av {
			if av[i] != bv[i] {
				agree = false
			}
		}
		return agree
	}
	k := 1
	if len(a.Shape) >= 2 && a.Shape[len(a.Shape)-1] >= 2 {
		k = int(a.Shape[len(a.Shape)-1])
	}
	if k >= 2 {
		for r := 0; r+k <= len(av); r += k {
			if argmax(av[r:r+k]) != argmax(bv[r:r+k]) {
				agree = false
			}
		}
		return agree
	}
	for i := range av {
		x, y := av[i], bv[i]
		if x >= 0 && x <= 1 && y >= 0 && y <= 1 {
			if (x >= 0.5) != (y >= 0.5) {
				agree = false
			}
		} else if !(math.Abs(x-y) <= tol*max(1, math.Abs(x))) {
			agree = false
		}
	}
	return agree
}

func argmax(v []float64) int {
	best := 0
	for i, x := range v {
		if x > v[best] || math.IsNaN(v[best]) {
			best = i
		}
	}
	return best
}

// candidate is a version in its shadow phase.
type candidate struct {
	l     *loaded
	since time.Time

	mu sync.Mutex
	// assign, gen and policy are the terms of the desired state that
	// last assigned the candidate: a later one may release a held
	// candidate (retarget). Read them with terms.
	assign    *pb.SlotAssignment
	gen       uint64
	policy    ShadowPolicy
	active    Ref
	offered   uint64
	skipped   uint64
	compared  uint64
	agreed    uint64
	errors    uint64
	maxDiff   float64
	sumDiff   float64
	elements  uint64
	candLat   WatchCounts // only the latency histogram is used
	activeLat WatchCounts
}

// shadowJob is one live call copied to a candidate.
type shadowJob struct {
	c         *candidate
	in, out   []tensor.Tensor
	activeLat time.Duration
}

func cloneTensors(ts []tensor.Tensor) []tensor.Tensor {
	out := make([]tensor.Tensor, len(ts))
	for i, t := range ts {
		out[i] = t
		out[i].Shape = append([]int64(nil), t.Shape...)
		out[i].Data = append([]byte(nil), t.Data...)
	}
	return out
}

// run answers one job with the candidate and counts the comparison.
func (j shadowJob) run(ctx context.Context) {
	c := j.c
	c.l.mu.RLock()
	model := c.l.model
	if model == nil { // dropped meanwhile
		c.l.mu.RUnlock()
		return
	}
	start := time.Now()
	out, err := model.Infer(ctx, j.in)
	took := time.Since(start)
	c.l.mu.RUnlock()
	if ctx.Err() != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.activeLat.Observe(j.activeLat, nil)
	if err != nil {
		c.errors++
		c.compared++ // a failure where the active answered is a disagreement
		c.candLat.Observe(took, nil)
		return
	}
	c.candLat.Observe(took, nil)
	cmp := Compare(j.out, out, c.policy.Tolerance)
	c.compared++
	if cmp.Agree {
		c.agreed++
	}
	c.maxDiff = max(c.maxDiff, cmp.MaxDiff)
	c.sumDiff += cmp.SumDiff
	c.elements += uint64(cmp.Elements)
}

func (c *candidate) stats() ShadowStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := ShadowStats{
		Candidate: c.l.ref, Active: c.active, Since: c.since,
		Offered: c.offered, Skipped: c.skipped, Compared: c.compared, Agreed: c.agreed, Errors: c.errors,
		MaxScoreDiff: c.maxDiff,
		CandidateP50: c.candLat.Percentile(0.5), CandidateP99: c.candLat.Percentile(0.99), ActiveP99: c.activeLat.Percentile(0.99),
	}
	if c.elements > 0 {
		s.MeanScoreDiff = c.sumDiff / float64(c.elements)
	}
	return s
}

// terms returns the candidate's policy, and the assignment and generation
// that set it.
func (c *candidate) terms() (ShadowPolicy, *pb.SlotAssignment, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.policy, c.assign, c.gen
}

// retarget makes assignment a of generation gen, with policy p, the
// candidate's terms; its figures so far stay. It reports whether anything
// changed.
func (c *candidate) retarget(p ShadowPolicy, a *pb.SlotAssignment, gen uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.policy == p && c.gen == gen {
		return false
	}
	c.policy, c.assign, c.gen = p, a, gen
	return true
}

// judge decides the shadow phase: switch (true, true), refuse (true,
// false) or wait (false). Figures come with either decision.
func (c *candidate) judge(now time.Time) (decided, promote bool, why string) {
	p, _, _ := c.terms()
	if p.Hold {
		return false, false, ""
	}
	s := c.stats()
	over := now.Sub(c.since) >= p.MaxDuration
	if s.Compared < uint64(p.MinInferences) && !over {
		return false, false, ""
	}
	if s.Compared == 0 {
		return true, true, fmt.Sprintf("no inferences to compare in %s; switching", p.MaxDuration)
	}
	if a := s.Agreement(); a < p.MinAgreement {
		return true, false, fmt.Sprintf("%s < %.3f", s, p.MinAgreement)
	}
	return true, true, fmt.Sprintf("%s >= %.3f", s, p.MinAgreement)
}
