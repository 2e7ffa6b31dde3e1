package deploy

// Unserved counts the slots of the accepted desired state that have no
// active model: converging ones are on their way (waiting for their turn,
// downloading, loading, or retrying after a failure a retry can fix), and
// failed ones were given up for this generation (a bundle that does not
// load or pass its checks, a version the agent refuses): only a new
// desired state can change them.
func (m *Manager) Unserved() (converging, failed int) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, a := range m.desired.GetSlots() {
		s := m.slots[a.GetSlot()]
		switch {
		case s != nil && s.active != nil:
		case s == nil || s.pending != nil || s.lastErr == "":
			converging++
		default:
			failed++
		}
	}
	return converging, failed
}
