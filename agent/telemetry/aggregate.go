package telemetry

// Aggregates on the device: every inference is folded, when it happens,
// into the InferenceAggregate of its (slot, model, version) for the current
// interval; at the interval's end the aggregates are closed and handed to
// the spool as TelemetryRecord.aggregate, the durable unit the controller
// rolls up per minute, device, cohort and version. Everything in an
// aggregate is a count, so two aggregates of the same key and interval
// (say, before and after an agent restart) merge by adding.
//
// What an aggregate holds (see RATIONALE.md, "Aggregates on the device"):
//
//   - count, errors (timeouts included) and timeouts;
//   - a latency histogram on LatencyBoundsUs, fixed for every model so any
//     two merge: p50/p95/p99 are read from the cumulative counts, to within
//     one bucket (a factor of about 1.6);
//   - per input feature and per output column, a histogram on the bin edges
//     of the manifest's reference (bundle.Reference), so the controller's
//     PSI and Jensen-Shannon against the reference are exact. Feature i is
//     column i of the inputs taken in manifest order, as bundle.Reference
//     says; outputs are matched by the reference's names ("out" or
//     "out[k]"). NaN values are counted as missing, outside every bucket;
//   - for a classifier (a first output of K >= 2 columns with K class
//     labels in the manifest), two derived histograms without a reference:
//     "OUT#class", the top class index (bounds 0.5, 1.5, ..., so bucket i is
//     class i), and "OUT#confidence", the top score on tenths (0.1 ... 0.9);
//   - data-quality counters over all input values: NaN values, and values
//     out of range, which is outside [first edge - span, last edge + span]
//     of the feature's reference, span being last edge - first edge (or
//     max(|edge|, 1) for a single edge): far enough outside the reference's
//     range that the sample never came close.
//
// Inputs are binned whether the call succeeded or not (they are what the
// device saw); outputs only when it succeeded.

import (
	"context"
	"log/slog"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// DefaultInterval is an aggregate's interval when none is configured: the
// controller's rollups are per minute.
const DefaultInterval = time.Minute

// LatencyBoundsUs are the inner bucket bounds of every latency histogram,
// in microseconds: the Renard R20 series (1, 1.12, 1.25, ... 9 per decade)
// from 1 µs to 100 s, 161 bounds. Each bucket is about 1.12 times as wide
// as the one before, so a percentile read from the histogram is within
// about 6 % of the true value, from a microsecond model to a stuck one.
// The rollout's latency gate compares percentiles against ratios such as
// 1.5: an earlier R5 series (buckets 1.6 times wide) was coarser than the
// ratio it had to judge. Histograms merge only on equal bounds, so these
// stay fixed once agents ship.
var LatencyBoundsUs = latencyBounds()

func latencyBounds() []float64 {
	var b []float64
	for p := 1; p < 1e8; p *= 10 {
		for _, m := range []int{100, 112, 125, 140, 160, 180, 200, 224, 250, 280, 315, 355, 400, 450, 500, 560, 630, 710, 800, 900} {
			// m*p/100 divided in float is the correctly rounded decimal.
			b = append(b, float64(m*p)/100)
		}
	}
	return append(b, 1e8)
}

// confidenceBounds bin a classifier's top score.
var confidenceBounds = []float64{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}

// Observation is one inference outcome, as the agent saw it.
type Observation struct {
	Slot, Model, Version string
	// At is when the call ended; zero means now. (The agent has read the
	// clock already; reading it again costs more than the folding.)
	At      time.Time
	Latency time.Duration
	// Failed is set for any error, Timeout also for a deadline hit.
	Failed, Timeout bool
	// Inputs and Outputs are the call's tensors (Outputs empty on failure).
	// Observe reads them and keeps nothing.
	Inputs, Outputs []tensor.Tensor
}

// AggregatorOptions configure an Aggregator. Emit is required.
type AggregatorOptions struct {
	// Interval is an aggregate's length (DefaultInterval). Intervals are
	// aligned to the Unix epoch, so every device's minute is the same.
	Interval time.Duration
	// Emit receives each closed aggregate. It must not block (the agent
	// passes its spool queue's Add).
	Emit func(*pb.TelemetryRecord)
	// Resolve returns the manifest and rollout id of the version active in
	// slot, for the reference histograms; nil, or a manifest of another
	// version, means counts and latency only.
	Resolve func(slot string) (*bundle.Manifest, string)
	Now     func() time.Time
	Logger  *slog.Logger
}

// Aggregator folds observations into per-interval aggregates. Observe is
// safe for concurrent use; Run closes intervals on time.
type Aggregator struct {
	o        AggregatorOptions
	interval int64 // ms

	mu    sync.Mutex
	start int64 // start of the open interval, Unix ms; 0 when none
	open  map[aggKey]*aggState
	// last is the aggregate observed last: a device mostly runs one
	// model, so this spares the map lookup.
	lastKey aggKey
	last    *aggState
	plans   map[aggKey]*plan
	totals  map[versionKey]*VersionTotals
}

type aggKey struct{ slot, model, version string }

type versionKey struct{ model, version string }

// VersionTotals are the counts of one model version since the agent
// started, for /metrics.
type VersionTotals struct {
	Model, Version   string
	Count            uint64
	Errors, Timeouts uint64
	// LatencyCounts has len(LatencyBoundsUs)+1 buckets (not cumulative).
	LatencyCounts []uint64
	LatencySum    time.Duration
}

// NewAggregator returns an aggregator with nothing open.
func NewAggregator(o AggregatorOptions) *Aggregator {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.Interval < time.Millisecond {
		o.Interval = time.Millisecond
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Aggregator{o: o, interval: o.Interval.Milliseconds(), open: map[aggKey]*aggState{},
		plans: map[aggKey]*plan{}, totals: map[versionKey]*VersionTotals{}}
}

// Interval returns the aggregation interval.
func (a *Aggregator) Interval() time.Duration { return a.o.Interval }

// Observe folds one inference into its aggregate. When the clock has
// passed the open interval, that interval is closed first.
func (a *Aggregator) Observe(ob *Observation) {
	at := ob.At
	if at.IsZero() {
		at = a.o.Now()
	}
	now := at.UnixMilli()
	start := now - now%a.interval
	var closed []*pb.TelemetryRecord
	a.mu.Lock()
	if start > a.start {
		// A clock that went back keeps counting into the open interval.
		closed = a.closeLocked()
		a.start = start
	}
	k := aggKey{ob.Slot, ob.Model, ob.Version}
	st := a.last
	if st == nil || k != a.lastKey {
		st = a.open[k]
		if st == nil {
			st = newAggState(a.planLocked(k))
			st.tot = a.totalsLocked(ob.Model, ob.Version)
			a.open[k] = st
		}
		a.lastKey, a.last = k, st
	}
	st.observe(ob)
	tot := st.tot
	tot.Count++
	if ob.Failed {
		tot.Errors++
	}
	if ob.Timeout {
		tot.Timeouts++
	}
	tot.LatencyCounts[st.latBucket]++
	tot.LatencySum += ob.Latency
	a.mu.Unlock()
	a.emit(closed)
}

func (a *Aggregator) totalsLocked(model, version string) *VersionTotals {
	vk := versionKey{model, version}
	tot := a.totals[vk]
	if tot == nil {
		tot = &VersionTotals{Model: model, Version: version, LatencyCounts: make([]uint64, len(LatencyBoundsUs)+1)}
		a.totals[vk] = tot
	}
	return tot
}

// planLocked returns the cached plan of k, or makes one from the
// manifest of the active version. A plan without a manifest (the version
// already left the slot) is not cached, so a later call may find it.
func (a *Aggregator) planLocked(k aggKey) *plan {
	if p := a.plans[k]; p != nil {
		return p
	}
	var man *bundle.Manifest
	var rollout string
	if a.o.Resolve != nil {
		man, rollout = a.o.Resolve(k.slot)
	}
	if man == nil || man.Name != k.model || man.Version != k.version {
		return &plan{}
	}
	p := newPlan(man, rollout)
	a.plans[k] = p
	return p
}

// Flush closes the open interval if the clock has passed its end, and
// emits its aggregates.
func (a *Aggregator) Flush() {
	now := a.o.Now().UnixMilli()
	a.mu.Lock()
	var closed []*pb.TelemetryRecord
	if a.start != 0 && now >= a.start+a.interval {
		closed = a.closeLocked()
		a.start = 0
	}
	a.mu.Unlock()
	a.emit(closed)
}

// CloseAll closes the open interval early (the agent is stopping) and
// emits its aggregates. They merge with the rest of the interval's, should
// the agent come back within it.
func (a *Aggregator) CloseAll() {
	a.mu.Lock()
	closed := a.closeLocked()
	a.start = 0
	a.mu.Unlock()
	a.emit(closed)
}

func (a *Aggregator) emit(recs []*pb.TelemetryRecord) {
	for _, r := range recs {
		a.o.Emit(r)
	}
}

// closeLocked turns the open aggregates into records, ordered by key so
// the spool's order does not depend on map iteration.
func (a *Aggregator) closeLocked() []*pb.TelemetryRecord {
	if len(a.open) == 0 {
		return nil
	}
	keys := make([]aggKey, 0, len(a.open))
	for k := range a.open {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		x, y := keys[i], keys[j]
		if x.slot != y.slot {
			return x.slot < y.slot
		}
		if x.model != y.model {
			return x.model < y.model
		}
		return x.version < y.version
	})
	out := make([]*pb.TelemetryRecord, 0, len(keys))
	for _, k := range keys {
		agg := a.open[k].proto(k, a.start, uint32(a.interval))
		out = append(out, &pb.TelemetryRecord{Body: &pb.TelemetryRecord_Aggregate{Aggregate: agg}})
	}
	clear(a.open)
	a.lastKey, a.last = aggKey{}, nil
	// Plans of versions no longer seen are dropped with their interval,
	// so a long-running agent does not keep every version it ever ran.
	for k := range a.plans {
		if !slices.Contains(keys, k) {
			delete(a.plans, k)
		}
	}
	return out
}

// Totals returns the per-version counts since start, sorted by model and
// version.
func (a *Aggregator) Totals() []VersionTotals {
	a.mu.Lock()
	out := make([]VersionTotals, 0, len(a.totals))
	for _, t := range a.totals {
		c := *t
		c.LatencyCounts = slices.Clone(t.LatencyCounts)
		out = append(out, c)
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		return out[i].Model < out[j].Model || out[i].Model == out[j].Model && out[i].Version < out[j].Version
	})
	return out
}

// Run closes each interval at its end until ctx ends, then closes the open
// one early (CloseAll) and returns nil.
func (a *Aggregator) Run(ctx context.Context) error {
	for {
		now := a.o.Now().UnixMilli()
		// A little past the boundary, so Flush sees the interval as ended.
		wait := time.Duration(a.interval-now%a.interval+1) * time.Millisecond
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			a.CloseAll()
			return nil
		case <-t.C:
			a.Flush()
		}
	}
}

// plan is how one model version's tensors map onto its reference
// histograms, worked out once per version.
type plan struct {
	rollout string
	// inputs, by manifest input name: the first feature column and the
	// row width.
	inputs []inputPlan
	// features holds the reference feature histograms (by column), nil
	// for a column without one.
	features []*bundle.RefHistogram
	lo, hi   []float64 // the in-range interval of each feature
	nFeat    int       // histograms in features
	// outputs maps output tensors onto reference output histograms.
	outputs []outputPlan
	outRefs []*bundle.RefHistogram
	// class is the classifier output whose top class and score are
	// binned, "" for none.
	class      string
	classWidth int
}

type inputPlan struct {
	name         string
	offset, cols int
}

type outputPlan struct {
	name string
	cols int
	// hist[k] is the index in outRefs of column k's histogram, -1 if none.
	hist []int
}

func newPlan(m *bundle.Manifest, rollout string) *plan {
	p := &plan{rollout: rollout}
	ref := m.Reference
	offset := 0
	for _, in := range m.Inputs {
		w, ok := rowCols(in.Shape)
		if !ok {
			// Columns cannot be numbered past an input of another shape.
			break
		}
		p.inputs = append(p.inputs, inputPlan{name: in.Name, offset: offset, cols: w})
		offset += w
	}
	if ref != nil && len(ref.Features) > 0 && len(ref.Features) == offset {
		p.features = make([]*bundle.RefHistogram, offset)
		p.lo, p.hi = make([]float64, offset), make([]float64, offset)
		for i := range ref.Features {
			h := &ref.Features[i]
			p.features[i] = h
			p.nFeat++
			if n := len(h.Edges); n > 0 {
				span := h.Edges[n-1] - h.Edges[0]
				if n == 1 {
					span = max(math.Abs(h.Edges[0]), 1)
				}
				p.lo[i], p.hi[i] = h.Edges[0]-span, h.Edges[n-1]+span
			} else {
				p.lo[i], p.hi[i] = math.Inf(-1), math.Inf(1)
			}
		}
	}
	if ref != nil {
		for i := range ref.Outputs {
			h := &ref.Outputs[i]
			name, col := h.Name, 0
			if base, idx, ok := strings.Cut(h.Name, "["); ok && strings.HasSuffix(idx, "]") {
				if n, err := strconv.Atoi(strings.TrimSuffix(idx, "]")); err == nil {
					name, col = base, n
				}
			}
			for _, o := range m.Outputs {
				w, ok := rowCols(o.Shape)
				if o.Name != name || !ok || col >= w {
					continue
				}
				j := slices.IndexFunc(p.outputs, func(op outputPlan) bool { return op.name == name })
				if j < 0 {
					hist := make([]int, w)
					for k := range hist {
						hist[k] = -1
					}
					p.outputs = append(p.outputs, outputPlan{name: name, cols: w, hist: hist})
					j = len(p.outputs) - 1
				}
				p.outputs[j].hist[col] = len(p.outRefs)
				p.outRefs = append(p.outRefs, h)
			}
		}
	}
	if len(m.Outputs) > 0 {
		if w, ok := rowCols(m.Outputs[0].Shape); ok && w >= 2 && len(m.Labels) == w {
			p.class, p.classWidth = m.Outputs[0].Name, w
		}
	}
	return p
}

// rowCols is the number of values per row of a [-1] or [-1, N] tensor.
func rowCols(shape []int64) (int, bool) {
	switch {
	case len(shape) == 1 && shape[0] == -1:
		return 1, true
	case len(shape) == 2 && shape[0] == -1 && shape[1] > 0 && shape[1] <= bundle.MaxRefHistograms:
		return int(shape[1]), true
	}
	return 0, false
}

// aggState is one open aggregate.
type aggState struct {
	p                      *plan
	tot                    *VersionTotals
	count, errors, timeout uint64
	latency                []uint64
	latBucket              int // the last observation's latency bucket
	nan, outOfRange        uint64
	feat                   [][]uint64
	featMissing            []uint64
	out                    [][]uint64
	outMissing             []uint64
	class, conf            []uint64
}

func newAggState(p *plan) *aggState {
	st := &aggState{p: p, latency: make([]uint64, len(LatencyBoundsUs)+1)}
	if p.nFeat > 0 {
		st.feat = make([][]uint64, len(p.features))
		st.featMissing = make([]uint64, len(p.features))
		for i, h := range p.features {
			if h != nil {
				st.feat[i] = make([]uint64, len(h.Edges)+1)
			}
		}
	}
	st.out = make([][]uint64, len(p.outRefs))
	st.outMissing = make([]uint64, len(p.outRefs))
	for i, h := range p.outRefs {
		st.out[i] = make([]uint64, len(h.Edges)+1)
	}
	if p.class != "" {
		st.class = make([]uint64, p.classWidth)
		st.conf = make([]uint64, len(confidenceBounds)+1)
	}
	return st
}

func (st *aggState) observe(ob *Observation) {
	st.count++
	if ob.Failed {
		st.errors++
	}
	if ob.Timeout {
		st.timeout++
	}
	us := float64(ob.Latency) / float64(time.Microsecond)
	st.latBucket = bucket(LatencyBoundsUs, us)
	st.latency[st.latBucket]++
	p := st.p
	for i := range ob.Inputs {
		st.observeInput(&ob.Inputs[i])
	}
	if ob.Failed {
		return
	}
	for i := range p.outputs {
		op := &p.outputs[i]
		t := findTensor(ob.Outputs, op.name)
		if t == nil {
			continue
		}
		n := t.Len()
		for j := 0; j < n; j++ {
			h := op.hist[j%op.cols]
			if h < 0 {
				continue
			}
			v := value(t, j)
			if v != v {
				st.outMissing[h]++
				continue
			}
			st.out[h][bucket(p.outRefs[h].Edges, v)]++
		}
	}
	if p.class != "" {
		if t := findTensor(ob.Outputs, p.class); t != nil {
			n := t.Len() / p.classWidth
			for r := 0; r < n; r++ {
				top, score := -1, math.Inf(-1)
				for k := 0; k < p.classWidth; k++ {
					if v := value(t, r*p.classWidth+k); v > score {
						top, score = k, v
					}
				}
				if top >= 0 {
					st.class[top]++
					st.conf[bucket(confidenceBounds, score)]++
				}
			}
		}
	}
}

func (st *aggState) observeInput(t *tensor.Tensor) {
	p := st.p
	var ip *inputPlan
	for i := range p.inputs {
		if p.inputs[i].name == t.Name {
			ip = &p.inputs[i]
			break
		}
	}
	floats := t.DType == tensor.FP32 || t.DType == tensor.FP64 || t.DType == tensor.FP16
	if ip == nil || p.nFeat == 0 {
		if floats {
			n := t.Len()
			for j := 0; j < n; j++ {
				if v := value(t, j); v != v {
					st.nan++
				}
			}
		}
		return
	}
	n := t.Len()
	for j := 0; j < n; j++ {
		f := ip.offset + j%ip.cols
		v := value(t, j)
		if v != v {
			st.nan++
			st.featMissing[f]++
			continue
		}
		h := p.features[f]
		if h == nil {
			continue
		}
		if v < p.lo[f] || v > p.hi[f] {
			st.outOfRange++
		}
		st.feat[f][bucket(h.Edges, v)]++
	}
}

// bucket is bundle.Bucket (the bucket of v on edges, -1 for NaN) without
// sort.Search's closure call per step, which costs more than the
// comparisons on the hot path.
func bucket(edges []float64, v float64) int {
	if v != v {
		return -1
	}
	lo, hi := 0, len(edges)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if edges[m] > v {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return lo
}

func findTensor(ts []tensor.Tensor, name string) *tensor.Tensor {
	for i := range ts {
		if ts[i].Name == name {
			return &ts[i]
		}
	}
	return nil
}

// value reads element i of t as float64 (little-endian, as every frame).
func value(t *tensor.Tensor, i int) float64 {
	d := t.Data
	switch t.DType {
	case tensor.FP32:
		return float64(math.Float32frombits(uint32(d[4*i]) | uint32(d[4*i+1])<<8 | uint32(d[4*i+2])<<16 | uint32(d[4*i+3])<<24))
	case tensor.FP64:
		return math.Float64frombits(le64(d[8*i:]))
	case tensor.BOOL, tensor.UINT8:
		return float64(d[i])
	case tensor.INT8:
		return float64(int8(d[i]))
	case tensor.UINT16:
		return float64(uint16(d[2*i]) | uint16(d[2*i+1])<<8)
	case tensor.INT16:
		return float64(int16(uint16(d[2*i]) | uint16(d[2*i+1])<<8))
	case tensor.UINT32:
		return float64(uint32(le64pad(d[4*i:], 4)))
	case tensor.INT32:
		return float64(int32(uint32(le64pad(d[4*i:], 4))))
	case tensor.UINT64:
		return float64(le64(d[8*i:]))
	case tensor.INT64:
		return float64(int64(le64(d[8*i:])))
	case tensor.FP16:
		if fs, err := (tensor.Tensor{DType: tensor.FP16, Shape: []int64{1}, Data: d[2*i : 2*i+2]}).Float32s(); err == nil {
			return float64(fs[0])
		}
	}
	return math.NaN()
}

func le64(b []byte) uint64 { return le64pad(b, 8) }

func le64pad(b []byte, n int) uint64 {
	var v uint64
	for k := n - 1; k >= 0; k-- {
		v = v<<8 | uint64(b[k])
	}
	return v
}

// proto turns the state into the wire aggregate.
func (st *aggState) proto(k aggKey, start int64, interval uint32) *pb.InferenceAggregate {
	a := &pb.InferenceAggregate{
		Slot: k.slot, Model: k.model, Version: k.version, RolloutId: st.p.rollout,
		StartUnixMs: start, IntervalMs: interval,
		Count: st.count, Errors: st.errors, Timeouts: st.timeout,
		LatencyUs:        &pb.Histogram{Bounds: slices.Clone(LatencyBoundsUs), Counts: st.latency},
		NanValues:        st.nan,
		OutOfRangeValues: st.outOfRange,
	}
	p := st.p
	for i, h := range p.outRefs {
		a.Outputs = append(a.Outputs, &pb.NamedHistogram{Name: h.Name, Missing: st.outMissing[i],
			Histogram: &pb.Histogram{Bounds: slices.Clone(h.Edges), Counts: st.out[i]}})
	}
	if p.class != "" {
		bounds := make([]float64, p.classWidth-1)
		for i := range bounds {
			bounds[i] = float64(i) + 0.5
		}
		a.Outputs = append(a.Outputs,
			&pb.NamedHistogram{Name: p.class + "#class", Histogram: &pb.Histogram{Bounds: bounds, Counts: st.class}},
			&pb.NamedHistogram{Name: p.class + "#confidence", Histogram: &pb.Histogram{Bounds: slices.Clone(confidenceBounds), Counts: st.conf}})
	}
	for i, h := range p.features {
		if h == nil {
			continue
		}
		a.Features = append(a.Features, &pb.NamedHistogram{Name: h.Name, Missing: st.featMissing[i],
			Histogram: &pb.Histogram{Bounds: slices.Clone(h.Edges), Counts: st.feat[i]}})
	}
	return a
}

// Quantile estimates the q-quantile (0 < q < 1) of the values counted in
// h, interpolating geometrically inside the bucket where it falls (the
// buckets of LatencyBoundsUs are log-spaced). Values below the first bound
// read as the first bound, above the last as the last. NaN when h is
// empty.
func Quantile(h *pb.Histogram, q float64) float64 {
	var total uint64
	for _, c := range h.GetCounts() {
		total += c
	}
	b := h.GetBounds()
	if total == 0 || len(b) == 0 || len(h.GetCounts()) != len(b)+1 {
		return math.NaN()
	}
	rank := q * float64(total)
	var seen float64
	for i, c := range h.GetCounts() {
		if c == 0 {
			continue
		}
		if seen+float64(c) < rank {
			seen += float64(c)
			continue
		}
		switch {
		case i == 0:
			return b[0]
		case i == len(b):
			return b[len(b)-1]
		}
		lo, hi := b[i-1], b[i]
		f := (rank - seen) / float64(c)
		if lo > 0 {
			return lo * math.Pow(hi/lo, f)
		}
		return lo + (hi-lo)*f
	}
	return b[len(b)-1]
}
