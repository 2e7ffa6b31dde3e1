package deploy

import pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"

// AgentRelease returns the agent release the accepted desired state names
// (nil: none) and the generation that ordered it (OrdersGeneration: a
// renewal keeps the order's generation, so a release that failed under
// it is not tried again). The manager only checks and persists it with
// the rest of the desired state; agent/update installs it.
func (m *Manager) AgentRelease() (*pb.AgentRelease, uint64) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.desired != nil {
		return m.desired.GetAgentRelease(), OrdersGeneration(m.desired)
	}
	return nil, m.accepted.Load()
}
