package rollout

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
)

func targets(n int, stratum func(i int) string) []Target {
	out := make([]Target, n)
	for i := range out {
		out[i] = Target{ID: fmt.Sprintf("dev-%04d", i)}
		if stratum != nil {
			out[i].Stratum = stratum(i)
		}
	}
	return out
}

func sizes(t *testing.T, ss ...string) []Size {
	t.Helper()
	out := make([]Size, len(ss))
	for i, s := range ss {
		v, err := ParseSize(s)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = v
	}
	return out
}

func waveSizes(p Plan) []int {
	var out []int
	for _, w := range p.Waves {
		out = append(out, len(w.Devices))
	}
	return out
}

func TestWaveCounts(t *testing.T) {
	cases := []struct {
		sizes []string
		n     int
		want  []int // cumulative
		from  []int
	}{
		{[]string{"1%", "10%", "50%", "100%"}, 200, []int{2, 20, 100, 200}, []int{0, 1, 2, 3}},
		{[]string{"1%", "10%", "50%", "100%"}, 40, []int{1, 4, 20, 40}, []int{0, 1, 2, 3}},
		// Every wave takes at least one device; a fleet too small for all
		// waves loses the last ones, and the last kept wave takes the rest.
		{[]string{"1%", "10%", "50%", "100%"}, 3, []int{1, 2, 3}, []int{0, 1, 2}},
		{[]string{"1%", "10%", "50%", "100%"}, 1, []int{1}, []int{0}},
		// Counts, mixed with percentages; the last wave always ends at n.
		{[]string{"5", "50", "100%"}, 30, []int{5, 30}, []int{0, 1}},
		{[]string{"5", "10"}, 30, []int{5, 30}, []int{0, 1}},
		{[]string{"10%"}, 7, []int{7}, []int{0}},
		// Percentages round up: 1% of 150 is 2 devices, not 1.
		{[]string{"1%", "100%"}, 150, []int{2, 150}, []int{0, 1}},
		{[]string{"33.3%", "66.6%", "100%"}, 10, []int{4, 7, 10}, []int{0, 1, 2}},
		{[]string{"100%"}, 0, nil, nil},
	}
	for _, c := range cases {
		got, from := WaveCounts(sizes(t, c.sizes...), c.n)
		if !reflect.DeepEqual(got, c.want) || !reflect.DeepEqual(from, c.from) {
			t.Errorf("WaveCounts(%v, %d) = %v %v, want %v %v", c.sizes, c.n, got, from, c.want, c.from)
		}
	}
}

func TestMakePlanDeterministicAndComplete(t *testing.T) {
	ts := targets(200, nil)
	ws := sizes(t, "1%", "10%", "50%", "100%")
	p1 := MakePlan("rollout-a", ts, ws)
	// Planning again, with the targets in another order, gives the same.
	shuffled := slices.Clone(ts)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	p2 := MakePlan("rollout-a", shuffled, ws)
	if !reflect.DeepEqual(p1, p2) {
		t.Fatal("the same rollout planned twice gave different waves")
	}
	if got := waveSizes(p1); !reflect.DeepEqual(got, []int{2, 18, 80, 100}) {
		t.Fatalf("wave sizes = %v", got)
	}
	seen := map[string]bool{}
	for _, w := range p1.Waves {
		for _, d := range w.Devices {
			if seen[d.ID] {
				t.Fatalf("%s planned twice", d.ID)
			}
			seen[d.ID] = true
		}
	}
	if len(seen) != 200 {
		t.Fatalf("%d devices planned, want 200", len(seen))
	}
	// Another rollout picks another first cohort: the same devices are not
	// always the canaries.
	p3 := MakePlan("rollout-b", ts, ws)
	if reflect.DeepEqual(p1.Waves[0], p3.Waves[0]) && reflect.DeepEqual(p1.Waves[1], p3.Waves[1]) {
		t.Fatal("two rollouts chose the same first waves")
	}
	// A device that joins the fleet does not reshuffle the others: the
	// first wave keeps its members or takes the newcomer in their place.
	more := append(slices.Clone(ts), Target{ID: "dev-new"})
	p4 := MakePlan("rollout-a", more, sizes(t, "50%", "100%"))
	p5 := MakePlan("rollout-a", ts, sizes(t, "50%", "100%"))
	common := 0
	for _, d := range p4.Waves[0].Devices {
		if slices.Contains(p5.Waves[0].Devices, d) {
			common++
		}
	}
	if common < len(p5.Waves[0].Devices)-1 {
		t.Fatalf("a new device moved %d devices out of the first wave", len(p5.Waves[0].Devices)-common)
	}
}

func TestMakePlanStratified(t *testing.T) {
	// 100 devices on 4 sites: 40, 30, 20, 10.
	site := func(i int) string {
		switch {
		case i < 40:
			return "a"
		case i < 70:
			return "b"
		case i < 90:
			return "c"
		}
		return "d"
	}
	p := MakePlan("strat", targets(100, site), sizes(t, "10%", "50%", "100%"))
	want := []map[string]int{
		{"a": 4, "b": 3, "c": 2, "d": 1},
		{"a": 16, "b": 12, "c": 8, "d": 4},
		{"a": 20, "b": 15, "c": 10, "d": 5},
	}
	for i, w := range p.Waves {
		got := map[string]int{}
		for _, d := range w.Devices {
			got[d.Stratum]++
		}
		if !reflect.DeepEqual(got, want[i]) {
			t.Errorf("wave %d by site = %v, want %v", i, got, want[i])
		}
	}
	// Uneven: 7 devices on 3 sites (4, 2, 1), waves of 1, 3, 7. The first
	// wave goes to the biggest site; every site is covered by the second.
	p = MakePlan("strat", targets(7, func(i int) string { return []string{"x", "x", "x", "x", "y", "y", "z"}[i] }), sizes(t, "1", "3", "100%"))
	if got := waveSizes(p); !reflect.DeepEqual(got, []int{1, 2, 4}) {
		t.Fatalf("sizes = %v", got)
	}
	if p.Waves[0].Devices[0].Stratum != "x" {
		t.Fatalf("first wave = %v", p.Waves[0].Devices)
	}
	covered := map[string]bool{}
	for _, w := range p.Waves[:2] {
		for _, d := range w.Devices {
			covered[d.Stratum] = true
		}
	}
	if len(covered) != 2 || !covered["y"] {
		// 3 devices over sizes 4:2:1 -> quotas 1.7, 0.9, 0.4: x, y, then x.
		t.Fatalf("sites covered by the first two waves = %v", covered)
	}
}

func TestSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		of   int
		want int
		err  bool
	}{
		{"10%", 200, 20, false},
		{"0.5%", 200, 1, false},
		{"100%", 7, 7, false},
		{"25", 10, 10, false},
		{"25", 100, 25, false},
		{"101%", 1, 0, true},
		{"-1", 1, 0, true},
		{"ten", 1, 0, true},
		{"%", 1, 0, true},
		{"NaN%", 1, 0, true},
	} {
		s, err := ParseSize(c.in)
		if (err != nil) != c.err {
			t.Errorf("ParseSize(%q) error = %v", c.in, err)
			continue
		}
		if err == nil && s.Of(c.of) != c.want {
			t.Errorf("%q of %d = %d, want %d", c.in, c.of, s.Of(c.of), c.want)
		}
	}
}
