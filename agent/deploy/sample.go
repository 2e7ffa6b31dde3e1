package deploy

import "math"

// SampleRate returns the share of slot's inferences whose raw inputs the
// accepted desired state asks to sample into telemetry
// (SlotAssignment.sample_rate): 0 (the default, nothing sampled) for a slot
// it does not list, clamped to [0, 1], and 0 for a value that is not a
// number.
func (m *Manager) SampleRate(slot string) float64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, s := range m.desired.GetSlots() {
		if s.GetSlot() == slot {
			r := s.GetSampleRate()
			if math.IsNaN(r) || r <= 0 {
				return 0
			}
			return min(r, 1)
		}
	}
	return 0
}
