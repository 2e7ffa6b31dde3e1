package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// DriftSource feeds the rollout engine's drift gate from the stored
// aggregates: the PSI of the new version's outputs on the wave's devices,
// over the wave's window, against the reference in the version's
// manifest. With several outputs the gate holds the largest.
type DriftSource struct {
	Store Reader
}

var _ rollout.DriftSource = (*DriftSource)(nil)

// Drift returns the wave's output PSI and how many outputs it counted. A
// version without a reference, or aggregates on other bins, is an error:
// the gate answers inconclusive and says why.
func (d *DriftSource) Drift(ctx context.Context, in *rollout.GateInput) (float64, int, error) {
	ms, err := d.Store.Minutes(ctx, store.MinuteQuery{Model: in.Model, Version: in.Version,
		DeviceIDs: slices.Sorted(maps.Keys(in.Devices)), Since: in.Since, Until: in.Until})
	if err != nil {
		return 0, 0, fmt.Errorf("read aggregates of %s@%s: %w", in.Model, in.Version, err)
	}
	agg := &pb.InferenceAggregate{}
	for _, m := range store.Authoritative(ms) {
		_ = summary.MergeAggregate(agg, m.Aggregate) // checked at ingest
	}
	ref, note := reference(ctx, d.Store, in.Model, in.Version)
	if ref == nil {
		return 0, 0, fmt.Errorf("%s", note)
	}
	if len(ref.Outputs) == 0 {
		return 0, 0, fmt.Errorf("the manifest of %s@%s has a reference without outputs; drift is judged on outputs", in.Model, in.Version)
	}
	dr := DriftOf(ref, agg)
	if len(dr.Outputs) == 0 {
		if dr.Note != "" {
			return 0, 0, fmt.Errorf("no output histograms of %s@%s to compare: %s", in.Model, in.Version, dr.Note)
		}
		return 0, 0, nil // nothing observed yet: too few outputs
	}
	return dr.MaxOutputPSI, int(dr.Observed), nil
}

// Pruner deletes telemetry past its retention.
type Pruner struct {
	Store interface {
		PruneTelemetry(ctx context.Context, rawBefore, aggBefore time.Time, limit int) (int64, int64, error)
	}
	// RawRetention keeps raw batch rows, AggRetention minute aggregates.
	RawRetention, AggRetention time.Duration
	// Every is how often it runs (default 10m).
	Every  time.Duration
	Logger *slog.Logger
	Now    func() time.Time
}

// pruneChunk bounds the batch rows one transaction deletes.
const pruneChunk = 5000

// Run prunes once at once, then every Every, until ctx ends.
func (p *Pruner) Run(ctx context.Context) error {
	every := p.Every
	if every <= 0 {
		every = 10 * time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		p.Prune(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Prune deletes what is past retention now, in chunks.
func (p *Pruner) Prune(ctx context.Context) {
	now, log := time.Now(), p.Logger
	if p.Now != nil {
		now = p.Now()
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var total, mins int64
	for ctx.Err() == nil {
		b, m, err := p.Store.PruneTelemetry(ctx, now.Add(-p.RawRetention), now.Add(-p.AggRetention), pruneChunk)
		if err != nil {
			if ctx.Err() == nil {
				log.Error("prune telemetry", "err", err)
			}
			return
		}
		total, mins = total+b, mins+m
		if b < pruneChunk {
			break
		}
	}
	if total > 0 || mins > 0 {
		log.Info("telemetry pruned", "batches", total, "minutes", mins, "raw_retention", p.RawRetention, "retention", p.AggRetention)
	}
}
