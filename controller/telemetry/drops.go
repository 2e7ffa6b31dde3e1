package telemetry

import (
	"maps"
	"slices"
	"sync"

	"github.com/edgefleet/edgefleet/controller/metrics"
)

// Drops keeps what each agent last reported it dropped from its spool, by
// class (ReportedState.spool_dropped_by_class, counters since the spool
// was made), and sums them per class for /metrics. Per-device series would
// be one per device and class; the per-device figures are in the API.
type Drops struct {
	mu    sync.Mutex
	byDev map[string]map[string]uint64
}

// NewDrops returns an empty tracker and registers its gauge on reg.
func NewDrops(reg *metrics.Registry) *Drops {
	d := &Drops{byDev: map[string]map[string]uint64{}}
	reg.GaugeVecFunc("edgefleet_controller_agent_spool_dropped",
		"Records agents dropped from their spools, by class (sample, inference, aggregate, event), summed over the devices' last reports.",
		d.samples)
	return d
}

// Report records a device's latest counters; nil or empty leaves the
// device's last report as it was (an older agent that does not send them).
func (d *Drops) Report(id string, byClass map[string]uint64) {
	if len(byClass) == 0 {
		return
	}
	d.mu.Lock()
	d.byDev[id] = maps.Clone(byClass)
	d.mu.Unlock()
}

// Total returns the sum per class.
func (d *Drops) Total() map[string]uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]uint64{}
	for _, m := range d.byDev {
		for c, n := range m {
			out[c] += n
		}
	}
	return out
}

func (d *Drops) samples() []metrics.Sample {
	t := d.Total()
	var out []metrics.Sample
	for _, c := range slices.Sorted(maps.Keys(t)) {
		out = append(out, metrics.Sample{Labels: []string{"class", c}, Value: float64(t[c])})
	}
	return out
}
