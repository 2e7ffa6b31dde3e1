package agent

// Telemetry records of inferences: per-inference records, the interval
// aggregates (telemetry.Aggregator) and sampled raw inputs, and their
// figures on /metrics.

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/localapi"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/agent/telemetry"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// MaxSampleBytes caps the EFT1 frame of one sampled raw input. A bigger
// input is not sampled (and counted): a sample must fit a telemetry batch
// with room to spare, and the spool drops samples first anyway.
const MaxSampleBytes = 32 << 10

// openSpool opens DATA/spool.db with the configured bounds.
func openSpool(ctx context.Context, path string, cfg Config) (*spool.SQLite, error) {
	return spool.OpenSQLiteOptions(ctx, path, spool.SQLiteOptions{MaxRecords: cfg.SpoolMaxRecords, MaxBytes: cfg.SpoolMaxBytes})
}

// newAggregator makes the agent's aggregator; its closed aggregates go
// through the spool queue like every other record.
func (a *Agent) newAggregator() *telemetry.Aggregator {
	return telemetry.NewAggregator(telemetry.AggregatorOptions{
		Interval: a.cfg.AggregateInterval, Emit: a.record, Resolve: a.resolveSlot, Logger: a.log,
	})
}

// resolveSlot returns the manifest and rollout id of the version active in
// slot, for the aggregator's reference histograms.
func (a *Agent) resolveSlot(slot string) (*bundle.Manifest, string) {
	man, ok := a.mgr.Manifest(slot)
	if !ok {
		return nil, ""
	}
	for _, s := range a.mgr.Slots() {
		if s.GetSlot() == slot {
			return man, s.GetRolloutId()
		}
	}
	return man, ""
}

// recordInference spools the per-inference record, folds the call into
// its aggregate, and samples its inputs when the slot's assignment asks.
func (a *Agent) recordInference(at time.Time, res deploy.Result, in []tensor.Tensor, err error) {
	rec := &pb.InferenceRecord{Model: res.Model, Version: res.Version, AtUnixMs: at.UnixMilli(),
		LatencyUs: uint32(min(res.Latency.Microseconds(), 1<<32-1))}
	if err != nil {
		rec.Error = err.Error()
	}
	a.record(&pb.TelemetryRecord{Body: &pb.TelemetryRecord_Inference{Inference: rec}})
	if agg := a.agg.Load(); agg != nil {
		agg.Observe(&telemetry.Observation{Slot: res.Slot, Model: res.Model, Version: res.Version,
			At: at.Add(res.Latency), Latency: res.Latency, Failed: err != nil, Timeout: errors.Is(err, host.ErrTimeout),
			Inputs: in, Outputs: res.Outputs})
	}
	if rate := a.mgr.SampleRate(res.Slot); rate > 0 && rand.Float64() < rate {
		a.sample(at, res, in)
	}
}

// sample spools the call's inputs as a RawSample.
func (a *Agent) sample(at time.Time, res deploy.Result, in []tensor.Tensor) {
	if tensor.FrameSize(in) > MaxSampleBytes {
		a.samplesSkipped.Add(1)
		return
	}
	frame, err := tensor.EncodeFrame(in)
	if err != nil {
		a.samplesSkipped.Add(1)
		return
	}
	a.samples.Add(1)
	a.record(&pb.TelemetryRecord{Body: &pb.TelemetryRecord_Sample{Sample: &pb.RawSample{
		Slot: res.Slot, Model: res.Model, Version: res.Version, AtUnixMs: at.UnixMilli(), Inputs: frame}}})
}

// droppedByClass is the spool's drop counters by class plus what the
// queue in front of it dropped, for ReportedState and /metrics.
func droppedByClass(ss spool.Stats, q *spool.Queue) map[string]uint64 {
	by := ss.ByClass()
	if q != nil {
		for k, v := range q.DroppedByClass() {
			by[k] += v
		}
	}
	return by
}

// writeTelemetryMetrics adds the inference, spool and sender figures of
// issue 6 to /metrics.
func (a *Agent) writeTelemetryMetrics(w io.Writer, ss spool.Stats, q *spool.Queue) {
	e := localapi.NewExposition(w)
	if agg := a.agg.Load(); agg != nil {
		tots := agg.Totals()
		e.Family("edgefleet_agent_inference_latency_seconds", "histogram", "Inference latency by model version, from the aggregates' buckets (the whole call, waiting for an instance included).")
		bounds := make([]float64, len(telemetry.LatencyBoundsUs))
		for i, us := range telemetry.LatencyBoundsUs {
			bounds[i] = us / 1e6
		}
		for _, t := range tots {
			e.Histogram("edgefleet_agent_inference_latency_seconds", []string{"model", t.Model, "version", t.Version}, bounds, t.LatencyCounts, t.LatencySum.Seconds())
		}
		e.Family("edgefleet_agent_inference_errors_total", "counter", "Failed inferences by model version, timeouts included.")
		for _, t := range tots {
			e.Sample("edgefleet_agent_inference_errors_total", []string{"model", t.Model, "version", t.Version}, float64(t.Errors))
		}
		e.Family("edgefleet_agent_inference_timeouts_total", "counter", "Inferences stopped by their deadline, by model version.")
		for _, t := range tots {
			e.Sample("edgefleet_agent_inference_timeouts_total", []string{"model", t.Model, "version", t.Version}, float64(t.Timeouts))
		}
		e.Family("edgefleet_agent_aggregate_interval_seconds", "gauge", "Length of the inference aggregates.")
		e.Sample("edgefleet_agent_aggregate_interval_seconds", nil, agg.Interval().Seconds())
	}
	by := droppedByClass(ss, q)
	classes := slices.Sorted(func(yield func(string) bool) {
		for k := range by {
			if !yield(k) {
				return
			}
		}
	})
	e.Family("edgefleet_agent_spool_dropped_by_class_total", "counter", "Records dropped by the spool's bound or a full queue, by class, in the order the policy drops them: sample, inference, aggregate, event.")
	for _, c := range classes {
		e.Sample("edgefleet_agent_spool_dropped_by_class_total", []string{"class", c}, float64(by[c]))
	}
	e.Family("edgefleet_agent_samples_total", "counter", "Raw inputs sampled into telemetry (SlotAssignment.sample_rate), and those skipped for being over the sample size cap.")
	e.Sample("edgefleet_agent_samples_total", []string{"outcome", "spooled"}, float64(a.samples.Load()))
	e.Sample("edgefleet_agent_samples_total", []string{"outcome", "too_large"}, float64(a.samplesSkipped.Load()))
	ts := a.sender.Stats()
	e.Family("edgefleet_agent_telemetry_inflight_batches", "gauge", "Telemetry batches waiting for their ack.")
	e.Sample("edgefleet_agent_telemetry_inflight_batches", nil, float64(ts.InFlight))
	e.Family("edgefleet_agent_telemetry_window_batches", "gauge", "The send window: most batches waiting for their ack at once.")
	e.Sample("edgefleet_agent_telemetry_window_batches", nil, float64(ts.Window))
	e.Family("edgefleet_agent_telemetry_records_total", "counter", "Records published in telemetry batches, resends included.")
	e.Sample("edgefleet_agent_telemetry_records_total", nil, float64(ts.Records))
	e.Family("edgefleet_agent_telemetry_compressed_batches_total", "counter", "Telemetry batches sent compressed (zstd).")
	e.Sample("edgefleet_agent_telemetry_compressed_batches_total", nil, float64(ts.Compressed))
	e.Family("edgefleet_agent_telemetry_bytes_total", "counter", "Telemetry batch bytes published (encoding=sent: as sent, compressed where they were; encoding=plain: the same batches uncompressed).")
	e.Sample("edgefleet_agent_telemetry_bytes_total", []string{"encoding", "sent"}, float64(ts.Bytes))
	e.Sample("edgefleet_agent_telemetry_bytes_total", []string{"encoding", "plain"}, float64(ts.PlainBytes))
	ls := a.link.Stats()
	e.Family("edgefleet_agent_mqtt_reconnects_total", "counter", "Broker connections after the first.")
	e.Sample("edgefleet_agent_mqtt_reconnects_total", nil, float64(max(ls.Connects, 1)-1))
	e.Family("edgefleet_agent_mqtt_dropped_total", "counter", "Messages from the controller dropped unread: oversized (over the payload cap) or otherwise malformed.")
	e.Sample("edgefleet_agent_mqtt_dropped_total", []string{"reason", "oversized"}, float64(ls.Oversized))
	e.Sample("edgefleet_agent_mqtt_dropped_total", []string{"reason", "malformed"}, float64(ls.Malformed-min(ls.Oversized, ls.Malformed)))
	if e.Err() != nil {
		a.log.Debug("metrics write failed", "err", e.Err())
	}
}

// capabilities are Capabilities plus what this agent's configuration
// adds.
func (a *Agent) capabilities() []string {
	caps := slices.Clone(Capabilities)
	if a.sender != nil && a.sender.Compresses() {
		caps = append(caps, wire.CapabilityTelemetryZstd)
	}
	return caps
}
