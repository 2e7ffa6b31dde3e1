package telemetry

import (
	"context"

	"github.com/edgefleet/edgefleet/controller/store"
)

// discard is a Store that keeps nothing and takes every record as new:
// the measuring instrument of BenchmarkIngestVsBroker's ingest-nostore and
// of a controller built with -tags benchnostore (nostore.go), never
// otherwise used.
type discard struct{}

func (discard) StoreTelemetryBatches(_ context.Context, batches []store.TelemetryBatch) ([]store.TelemetryResult, error) {
	out := make([]store.TelemetryResult, len(batches))
	for i, b := range batches {
		out[i].Inserted = len(b.Records) + len(b.Inferences)
	}
	return out, nil
}
