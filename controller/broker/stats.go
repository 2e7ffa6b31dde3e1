package broker

import "github.com/mochi-mqtt/server/v2/system"

// Stats returns a snapshot of the embedded broker's counters (clients,
// messages received, sent and dropped, inflight, retained), for the
// controller's /metrics.
func (b *Broker) Stats() *system.Info { return b.srv.Info.Clone() }
