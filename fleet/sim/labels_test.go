package sim

import (
	"fmt"
	"math"
	"strings"
	"testing"
)

func TestParseLabels(t *testing.T) {
	tests := []struct {
		spec string
		want string // String() of the result
		err  string // substring of the error
	}{
		{spec: "", want: ""},
		{spec: "  ", want: ""},
		{spec: "region=eu:60,us:40", want: "region=eu:60,us:40"},
		{spec: "region=eu:60,us:40;hw=jetson,rpi5", want: "region=eu:60,us:40;hw=jetson:1,rpi5:1"},
		{spec: "site=s1..s3", want: "site=s1:1,s2:1,s3:1"},
		{spec: "site=s08..s10:2", want: "site=s08:2,s09:2,s10:2"},
		{spec: "rack=1..2", want: "rack=1:1,2:1"},
		{spec: " region = eu , us ; ", want: "region=eu:1,us:1"},
		{spec: "k8s.io/zone=a:0.5,b:1.5", want: "k8s.io/zone=a:0.5,b:1.5"},
		{spec: "region", err: "want key=value"},
		{spec: "=eu", err: "want key=value"},
		{spec: "region=", err: `region=""`},
		{spec: "region=eu,,us", err: `region=""`},
		{spec: "region=eu:0", err: "positive number"},
		{spec: "region=eu:-1", err: "positive number"},
		{spec: "region=eu:x", err: "positive number"},
		{spec: "region=eu:NaN", err: "positive number"},
		{spec: "region=eu;region=us", err: "appears twice"},
		{spec: "region=eu,eu", err: "listed twice"},
		{spec: "site=s1..s3,s2", err: "listed twice"},
		{spec: "-bad=eu", err: `key "-bad"`},
		{spec: "region=e u", err: `region="e u"`},
		{spec: "site=s5..s1", err: "range"},
		{spec: "site=a1..b3", err: "same prefix"},
		{spec: "site=s1..s99999", err: "range"},
		{spec: "site=s1..s6000;rack=r1..r6000", err: "more than"},
		{spec: "k=" + strings.Repeat("v", 5000), err: "over the limit"},
	}
	for _, tt := range tests {
		name := tt.spec
		if len(name) > 40 {
			name = name[:40] + "..."
		}
		t.Run(name, func(t *testing.T) {
			l, err := ParseLabels(tt.spec)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ParseLabels(%q) = %v, %v; want an error containing %q", tt.spec, l, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseLabels(%q): %v", tt.spec, err)
			}
			if got := l.String(); got != tt.want {
				t.Fatalf("ParseLabels(%q) = %q, want %q", tt.spec, got, tt.want)
			}
			// String is parseable again and means the same.
			again, err := ParseLabels(l.String())
			if err != nil || again.String() != tt.want {
				t.Fatalf("round trip of %q: %q, %v", tt.want, again.String(), err)
			}
		})
	}
}

func TestLabelsAssign(t *testing.T) {
	l, err := ParseLabels("region=eu:60,us:40;hw=jetson:1,rpi5:1,x86:1;site=s1..s20")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{0, 1, 7, 200, 1001} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			got := l.Assign(n, 42)
			if len(got) != n {
				t.Fatalf("Assign(%d) gave %d label sets", n, len(got))
			}
			count := map[string]int{}
			for _, m := range got {
				if len(m) != 3 {
					t.Fatalf("device labels %v: want one value for each of the 3 keys", m)
				}
				for k, v := range m {
					count[k+"="+v]++
				}
			}
			// Largest remainder: every count is within one of its share.
			shares := map[string]float64{"region=eu": 0.6, "region=us": 0.4, "hw=jetson": 1.0 / 3, "hw=rpi5": 1.0 / 3, "hw=x86": 1.0 / 3}
			for i := 1; i <= 20; i++ {
				shares[fmt.Sprintf("site=s%d", i)] = 0.05
			}
			for kv, share := range shares {
				if d := math.Abs(float64(count[kv]) - share*float64(n)); d >= 1 {
					t.Errorf("%s: %d of %d devices, want %.2f", kv, count[kv], n, share*float64(n))
				}
			}
			again := l.Assign(n, 42)
			other := l.Assign(n, 43)
			same, differ := true, false
			for i := range got {
				for k := range got[i] {
					same = same && got[i][k] == again[i][k]
					differ = differ || got[i][k] != other[i][k]
				}
			}
			if !same {
				t.Error("the same seed gave different labels")
			}
			if n >= 200 && !differ {
				t.Error("another seed gave the very same labels")
			}
		})
	}
	if got := (Labels{}).Assign(3, 1); len(got) != 3 || len(got[0]) != 0 {
		t.Fatalf("zero Labels: %v", got)
	}
}

func TestPick(t *testing.T) {
	for _, tt := range []struct {
		n    int
		frac float64
		want int
	}{{200, 0.2, 40}, {200, 0, 0}, {200, 1, 200}, {3, 0.5, 2}, {10, 0.04, 0}, {0, 0.5, 0}} {
		got := pick(tt.n, tt.frac, 7, 1)
		if len(got) != tt.want {
			t.Errorf("pick(%d, %v) chose %d, want %d", tt.n, tt.frac, len(got), tt.want)
		}
		for i := range got {
			if i < 0 || i >= tt.n {
				t.Errorf("pick(%d, %v) chose index %d", tt.n, tt.frac, i)
			}
		}
	}
	a, b := pick(1000, 0.3, 7, 1), pick(1000, 0.3, 7, 2)
	overlap := 0
	for i := range a {
		if b[i] {
			overlap++
		}
	}
	// Independent streams: about 0.3×0.3×1000 = 90 in common, not 300.
	if overlap > 200 {
		t.Errorf("two streams picked %d of the same 300 devices; they should be independent", overlap)
	}
}

func FuzzParseLabels(f *testing.F) {
	for _, s := range []string{"region=eu:60,us:40;hw=jetson,rpi5;site=s1..s20", "a=b", "x=01..10:3", ";;", "k=v:1e308"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		l, err := ParseLabels(spec)
		if err != nil {
			return
		}
		again, err := ParseLabels(l.String())
		if err != nil {
			t.Fatalf("String() of a parsed spec does not parse: %q: %v", l.String(), err)
		}
		if again.String() != l.String() {
			t.Fatalf("round trip changed %q into %q", l.String(), again.String())
		}
		for _, m := range l.Assign(5, 1) {
			if len(m) != len(l.keys) {
				t.Fatalf("device got %d labels, want %d", len(m), len(l.keys))
			}
		}
	})
}
