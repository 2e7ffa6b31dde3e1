//go:build benchnostore

package telemetry

// Built with -tags benchnostore, ingest stores nothing (discard). No
// release is built so; scripts/bench builds such a controller on request
// (-controller-tags benchnostore) to measure what ingest costs besides its
// store, the bound no storage design could beat, against the broker's raw
// delivery in the same run.
func init() {
	withoutStore = func(Store) Store { return discard{} }
}
