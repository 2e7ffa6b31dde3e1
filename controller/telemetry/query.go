package telemetry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Reader is what queries read from the store.
type Reader interface {
	Minutes(ctx context.Context, q store.MinuteQuery) ([]store.Minute, error)
	Model(ctx context.Context, name, version string) (store.Model, error)
	Rollout(ctx context.Context, id string) (store.Rollout, error)
	RolloutDevices(ctx context.Context, id string) ([]store.RolloutDevice, error)
}

// Grouping of a query's figures.
const (
	ByVersion = "version" // one group per model version
	ByDevice  = "device"  // one group per device and model version
)

// Query selects the telemetry to sum up. Empty fields select everything.
type Query struct {
	Model, Version string
	DeviceID       string
	// RolloutID keeps the rollout's devices (its cohort); Wave >= 0 keeps
	// one wave's. Model and Version default to the rollout's.
	RolloutID string
	Wave      int
	// Since and Until bound the time, to the minute.
	Since, Until time.Time
	// By is ByVersion (default) or ByDevice.
	By string
}

// Figures sum up one group's inferences.
type Figures struct {
	Model    string `json:"model"`
	Version  string `json:"version"`
	DeviceID string `json:"deviceId,omitempty"`
	// Devices counts the devices with inferences in the group.
	Devices   int     `json:"devices"`
	Count     uint64  `json:"count"`
	Errors    uint64  `json:"errors"`
	Timeouts  uint64  `json:"timeouts"`
	ErrorRate float64 `json:"errorRate"`
	// Latencies of successful inferences, from the merged histograms.
	LatencyP50Ms float64 `json:"latencyP50Ms"`
	LatencyP95Ms float64 `json:"latencyP95Ms"`
	LatencyP99Ms float64 `json:"latencyP99Ms"`
	NaNValues    uint64  `json:"nanValues"`
	OutOfRange   uint64  `json:"outOfRangeValues"`
	// First and Last are the first and last minute with data.
	First time.Time `json:"first"`
	Last  time.Time `json:"last"`
	Drift *Drift    `json:"drift,omitempty"`
}

// Drift compares a group's output and feature histograms with the
// reference in the model's manifest.
type Drift struct {
	Outputs  []DriftFigure `json:"outputs,omitempty"`
	Features []DriftFigure `json:"features,omitempty"`
	// MaxOutputPSI and MaxOutputJS are the largest over the outputs: what
	// the drift gate holds under its limit.
	MaxOutputPSI float64 `json:"maxOutputPsi"`
	MaxOutputJS  float64 `json:"maxOutputJs"`
	// Observed is the most values any output histogram counted.
	Observed uint64 `json:"observed"`
	// Note says why figures are missing (no reference, other bins).
	Note string `json:"note,omitempty"`
}

// DriftFigure is the drift of one output or feature.
type DriftFigure struct {
	Name     string  `json:"name"`
	Observed uint64  `json:"observed"`
	PSI      float64 `json:"psi"`
	JS       float64 `json:"js"`
}

// ErrBadQuery is wrapped by errors about the query itself.
var ErrBadQuery = errors.New("bad telemetry query")

// Summarize sums up the minute aggregates q selects. Each device-minute
// counts once (store.Authoritative).
func Summarize(ctx context.Context, r Reader, q Query) ([]Figures, error) {
	mq := store.MinuteQuery{Model: q.Model, Version: q.Version, Since: q.Since, Until: q.Until}
	if q.By == "" {
		q.By = ByVersion
	}
	if q.By != ByVersion && q.By != ByDevice {
		return nil, fmt.Errorf("%w: by=%q: use version or device", ErrBadQuery, q.By)
	}
	if q.RolloutID != "" {
		ro, err := r.Rollout(ctx, q.RolloutID)
		if err != nil {
			return nil, fmt.Errorf("rollout %s: %w", q.RolloutID, err)
		}
		if mq.Model == "" {
			mq.Model, mq.Version = ro.Model, ro.Version
		}
		devs, err := r.RolloutDevices(ctx, q.RolloutID)
		if err != nil {
			return nil, fmt.Errorf("rollout %s: %w", q.RolloutID, err)
		}
		mq.DeviceIDs = []string{}
		for _, d := range devs {
			if q.Wave < 0 || d.Wave == q.Wave {
				mq.DeviceIDs = append(mq.DeviceIDs, d.DeviceID)
			}
		}
	}
	if q.DeviceID != "" {
		if mq.DeviceIDs != nil && !slices.Contains(mq.DeviceIDs, q.DeviceID) {
			return nil, nil
		}
		mq.DeviceIDs = []string{q.DeviceID}
	}
	ms, err := r.Minutes(ctx, mq)
	if err != nil {
		return nil, err
	}
	type key struct{ model, version, device string }
	groups := map[key]*group{}
	var order []key
	for _, m := range store.Authoritative(ms) {
		k := key{m.Model, m.Version, ""}
		if q.By == ByDevice {
			k.device = m.DeviceID
		}
		g := groups[k]
		if g == nil {
			g = &group{agg: &pb.InferenceAggregate{Model: m.Model, Version: m.Version}, devices: map[string]bool{}}
			groups[k] = g
			order = append(order, k)
		}
		g.add(m)
	}
	slices.SortFunc(order, func(a, b key) int {
		return strings.Compare(a.model+"\x00"+a.version+"\x00"+a.device, b.model+"\x00"+b.version+"\x00"+b.device)
	})
	refs := map[[2]string]*bundle.Reference{}
	var out []Figures
	for _, k := range order {
		g := groups[k]
		f := g.figures()
		f.DeviceID = k.device
		rk := [2]string{k.model, k.version}
		ref, ok := refs[rk]
		var note string
		if !ok {
			ref, note = reference(ctx, r, k.model, k.version)
			refs[rk] = ref
		}
		f.Drift = DriftOf(ref, g.agg)
		if note != "" && f.Drift.Note == "" {
			f.Drift.Note = note
		}
		out = append(out, f)
	}
	return out, nil
}

type group struct {
	agg         *pb.InferenceAggregate
	devices     map[string]bool
	first, last time.Time
}

func (g *group) add(m store.Minute) {
	// Histograms that do not merge were refused at ingest; an error here
	// would only be an old row, and its counts still add.
	_ = summary.MergeAggregate(g.agg, m.Aggregate)
	if m.Aggregate.GetCount() > 0 {
		g.devices[m.DeviceID] = true
	}
	if g.first.IsZero() || m.Start.Before(g.first) {
		g.first = m.Start
	}
	if m.Start.After(g.last) {
		g.last = m.Start
	}
}

func (g *group) figures() Figures {
	a := g.agg
	f := Figures{Model: a.Model, Version: a.Version, Devices: len(g.devices), Count: a.Count, Errors: a.Errors, Timeouts: a.Timeouts,
		NaNValues: a.NanValues, OutOfRange: a.OutOfRangeValues, First: g.first, Last: g.last}
	if a.Count > 0 {
		f.ErrorRate = float64(a.Errors) / float64(a.Count)
	}
	if h := a.GetLatencyUs(); h != nil {
		f.LatencyP50Ms = summary.Quantile(h, 0.50) / 1000
		f.LatencyP95Ms = summary.Quantile(h, 0.95) / 1000
		f.LatencyP99Ms = summary.Quantile(h, 0.99) / 1000
	}
	return f
}

// reference reads the drift reference from model@version's manifest; the
// note says why there is none.
func reference(ctx context.Context, r Reader, model, version string) (*bundle.Reference, string) {
	m, err := r.Model(ctx, model, version)
	if err != nil {
		return nil, fmt.Sprintf("model %s@%s is not in the registry (%v), so there is no reference to compare with", model, version, err)
	}
	var man bundle.Manifest
	if err := json.Unmarshal(m.Manifest, &man); err != nil {
		return nil, fmt.Sprintf("the manifest of %s@%s does not parse: %v", model, version, err)
	}
	if man.Reference == nil {
		return nil, fmt.Sprintf("the manifest of %s@%s has no reference histograms; build the bundle with a reference sample to measure drift", model, version)
	}
	return man.Reference, ""
}

// DriftOf compares agg's output and feature histograms with ref, by name.
// A histogram on other bins than the reference's is left out with a note:
// only the same bins give exact PSI and JS.
func DriftOf(ref *bundle.Reference, agg *pb.InferenceAggregate) *Drift {
	d := &Drift{}
	if ref == nil {
		d.Note = "no reference"
		return d
	}
	var notes []string
	cmp := func(refs []bundle.RefHistogram, got []*pb.NamedHistogram) []DriftFigure {
		var out []DriftFigure
		for _, rh := range refs {
			i := slices.IndexFunc(got, func(n *pb.NamedHistogram) bool { return n.GetName() == rh.Name })
			if i < 0 {
				continue
			}
			h := got[i].GetHistogram()
			if !slices.Equal(h.GetBounds(), rh.Edges) || len(h.GetCounts()) != len(rh.Counts) {
				notes = append(notes, fmt.Sprintf("%s is binned on other edges than the reference", rh.Name))
				continue
			}
			psi, err1 := summary.PSI(rh.Counts, h.GetCounts())
			js, err2 := summary.JS(rh.Counts, h.GetCounts())
			if err := errors.Join(err1, err2); err != nil {
				notes = append(notes, fmt.Sprintf("%s: %v", rh.Name, err))
				continue
			}
			out = append(out, DriftFigure{Name: rh.Name, Observed: summary.Total(h), PSI: psi, JS: js})
		}
		return out
	}
	d.Outputs = cmp(ref.Outputs, agg.GetOutputs())
	d.Features = cmp(ref.Features, agg.GetFeatures())
	for _, o := range d.Outputs {
		d.MaxOutputPSI = max(d.MaxOutputPSI, o.PSI)
		d.MaxOutputJS = max(d.MaxOutputJS, o.JS)
		d.Observed = max(d.Observed, o.Observed)
	}
	d.Note = strings.Join(notes, "; ")
	return d
}
