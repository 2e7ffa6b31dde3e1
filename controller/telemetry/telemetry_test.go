package telemetry

import (
	"fmt"
	"slices"
	"testing"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

func TestRanges(t *testing.T) {
	cases := []struct {
		in   []uint64
		want string
	}{
		{nil, ""},
		{[]uint64{5}, "5-5"},
		{[]uint64{1, 2, 3}, "1-3"},
		{[]uint64{3, 1, 2, 2, 8, 7, 5}, "1-3 5-5 7-8"},
		{[]uint64{0, 1<<64 - 1, 1<<64 - 2}, "0-0 18446744073709551614-18446744073709551615"},
		{[]uint64{10, 12, 14}, "10-10 12-12 14-14"},
	}
	for _, c := range cases {
		if got := format(Ranges(c.in)); got != c.want {
			t.Errorf("Ranges(%v) = %q, want %q", c.in, got, c.want)
		}
	}
}

func format(rs []*pb.SeqRange) string {
	s := ""
	for i, r := range rs {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf("%d-%d", r.GetFirst(), r.GetLast())
	}
	return s
}

// FuzzRanges checks that the ranges cover exactly the input's numbers,
// sorted, disjoint and not adjacent (fully coalesced).
func FuzzRanges(f *testing.F) {
	f.Add([]byte{1, 2, 3, 5, 7, 8})
	f.Add([]byte{255, 0, 255})
	f.Fuzz(func(t *testing.T, raw []byte) {
		var seqs []uint64
		for _, b := range raw {
			seqs = append(seqs, uint64(b))
		}
		rs := Ranges(seqs)
		var covered []uint64
		for i, r := range rs {
			if r.GetFirst() > r.GetLast() {
				t.Fatalf("range %v is inverted", r)
			}
			if i > 0 && r.GetFirst() <= rs[i-1].GetLast()+1 {
				t.Fatalf("ranges %v and %v overlap or touch", rs[i-1], r)
			}
			for v := r.GetFirst(); v <= r.GetLast(); v++ {
				covered = append(covered, v)
			}
		}
		want := slices.Clone(seqs)
		slices.Sort(want)
		want = slices.Compact(want)
		if !slices.Equal(covered, want) {
			t.Fatalf("Ranges(%v) covers %v", seqs, covered)
		}
	})
}
