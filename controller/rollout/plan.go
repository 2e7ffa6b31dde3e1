package rollout

import (
	"cmp"
	"container/heap"
	"crypto/sha256"
	"encoding/binary"
	"slices"
)

// Target is a device a rollout may update.
type Target struct {
	ID string
	// Stratum is the device's value of the strategy's stratifyBy label
	// ("" when the label is absent or the rollout is not stratified).
	Stratum string
}

// PlannedWave is one wave of a plan.
type PlannedWave struct {
	// Spec is the index of the wave in the specification this wave
	// carries out (waves that would be empty are left out of a plan).
	Spec int
	// Devices are in the order they are notified.
	Devices []Target
}

// Plan is the membership of every wave.
type Plan struct {
	Waves []PlannedWave
}

// cohortKey places a device in a rollout: a hash of (seed, device), so the
// order is deterministic for a rollout, unrelated between rollouts, and
// independent of which other devices exist.
func cohortKey(seed, id string) uint64 {
	h := sha256.New()
	h.Write([]byte(seed))
	h.Write([]byte{0})
	h.Write([]byte(id))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// WaveCounts turns cumulative wave sizes into cumulative device counts out
// of n: each wave at least one more than the one before, the last one n,
// and waves that would add nothing dropped. It returns the counts and, for
// each, the index of the size it came from.
func WaveCounts(sizes []Size, n int) (counts, from []int) {
	prev := 0
	for i, s := range sizes {
		if prev >= n {
			break
		}
		c := max(s.Of(n), prev+1)
		if i == len(sizes)-1 {
			c = n
		}
		c = min(c, n)
		counts = append(counts, c)
		from = append(from, i)
		prev = c
	}
	return counts, from
}

// MakePlan assigns targets to waves. seed is the rollout's name; the same
// seed, targets and sizes always give the same plan, whatever order the
// targets come in. Without strata, devices are taken in the order of their
// cohort key. With strata, each wave takes from every stratum in proportion
// to its share of all targets (largest shortfall first), so a wave of 10%
// holds about 10% of each site.
func MakePlan(seed string, targets []Target, sizes []Size) Plan {
	keyed := make([]keyedTarget, len(targets))
	for i, t := range targets {
		keyed[i] = keyedTarget{Target: t, key: cohortKey(seed, t.ID)}
	}
	slices.SortFunc(keyed, func(a, b keyedTarget) int {
		if c := cmp.Compare(a.key, b.key); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	counts, from := WaveCounts(sizes, len(keyed))

	// Strata, each in key order, named in sorted order for tie-breaks.
	byName := map[string]*stratum{}
	var strata []*stratum
	for _, k := range keyed {
		s := byName[k.Stratum]
		if s == nil {
			s = &stratum{name: k.Stratum}
			byName[k.Stratum] = s
			strata = append(strata, s)
		}
		s.devices = append(s.devices, k.Target)
	}
	slices.SortFunc(strata, func(a, b *stratum) int { return cmp.Compare(a.name, b.name) })

	var plan Plan
	total := len(keyed)
	prev := 0
	for w, c := range counts {
		pw := PlannedWave{Spec: from[w], Devices: make([]Target, 0, c-prev)}
		if len(strata) == 1 {
			s := strata[0]
			pw.Devices = append(pw.Devices, s.devices[s.taken:c]...)
			s.taken = c
		} else {
			h := make(shortfalls, 0, len(strata))
			for _, s := range strata {
				if s.taken < len(s.devices) {
					// The stratum's quota of the first c devices.
					s.quota = float64(c) * float64(len(s.devices)) / float64(total)
					h = append(h, s)
				}
			}
			heap.Init(&h)
			for range c - prev {
				s := h[0]
				pw.Devices = append(pw.Devices, s.devices[s.taken])
				s.taken++
				if s.taken == len(s.devices) {
					heap.Pop(&h)
				} else {
					heap.Fix(&h, 0)
				}
			}
		}
		plan.Waves = append(plan.Waves, pw)
		prev = c
	}
	return plan
}

type keyedTarget struct {
	Target
	key uint64
}

type stratum struct {
	name    string
	devices []Target
	taken   int
	quota   float64
}

// shortfalls is a max-heap of strata by how far they are below their
// quota; ties go to the stratum with the smaller share taken, then by name.
type shortfalls []*stratum

func (h shortfalls) Len() int { return len(h) }
func (h shortfalls) Less(i, j int) bool {
	a, b := h[i], h[j]
	da, db := a.quota-float64(a.taken), b.quota-float64(b.taken)
	if da != db {
		return da > db
	}
	fa, fb := float64(a.taken)/float64(len(a.devices)), float64(b.taken)/float64(len(b.devices))
	if fa != fb {
		return fa < fb
	}
	return a.name < b.name
}
func (h shortfalls) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *shortfalls) Push(x any)   { *h = append(*h, x.(*stratum)) }
func (h *shortfalls) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
