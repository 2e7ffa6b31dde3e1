package deploy

import pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"

// AgentRelease returns the agent release the accepted desired state names
// (nil: none) and that state's generation. The manager only checks and
// persists it with the rest of the desired state; agent/update installs it.
func (m *Manager) AgentRelease() (*pb.AgentRelease, uint64) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.desired.GetAgentRelease(), m.accepted.Load()
}
