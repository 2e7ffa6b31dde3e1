package sim

import (
	"fmt"
	"math/rand/v2"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Labels is a distribution of device labels over a simulated fleet: for
// each key, the values it takes and their weights. Build one with
// ParseLabels. The zero value gives no labels.
type Labels struct {
	keys []labelKey
}

type labelKey struct {
	key     string
	choices []labelChoice
}

type labelChoice struct {
	value  string
	weight float64
}

// maxLabelSpec caps the --labels text: it is typed by people, and a range
// like s1..s999999 must not turn into a million choices.
const (
	maxLabelSpec    = 4 << 10
	maxLabelChoices = 10_000
)

// The same rules the agent applies to its labels (agent.Config.Validate),
// checked here so that a bad --labels fails before any agent starts.
var (
	labelKeyRE   = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`)
	labelValueRE = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$`)
	rangeRE      = regexp.MustCompile(`^([A-Za-z._-]*)([0-9]+)\.\.([A-Za-z._-]*)([0-9]+)$`)
)

// ParseLabels reads a label distribution:
//
//	region=eu:60,us:40;hw=jetson,rpi5;site=s1..s20
//
// Groups are separated by ';', one per key. Each group is key=choices,
// choices separated by ','. A choice is a value with an optional
// ':weight' (a positive number; default 1). A choice "s1..s20" stands for
// the values s1, s2, ... s20, each with the choice's weight; "s01..s20"
// keeps the zero padding. Weights are relative: eu:60,us:40 and eu:3,us:2
// are the same. The empty string gives no labels.
func ParseLabels(spec string) (Labels, error) {
	var l Labels
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return l, nil
	}
	if len(spec) > maxLabelSpec {
		return l, fmt.Errorf("labels: %d characters is over the limit of %d; use ranges like s1..s500", len(spec), maxLabelSpec)
	}
	seen := map[string]bool{}
	total := 0
	for _, group := range strings.Split(spec, ";") {
		group = strings.TrimSpace(group)
		if group == "" {
			continue
		}
		key, rest, ok := strings.Cut(group, "=")
		key = strings.TrimSpace(key)
		if !ok || key == "" {
			return l, fmt.Errorf("labels: group %q: want key=value[:weight],...; e.g. region=eu:60,us:40", group)
		}
		if !labelKeyRE.MatchString(key) {
			return l, fmt.Errorf("labels: key %q: use 1-63 letters, digits, '.', '_', '-' or '/', starting and ending with a letter or digit", key)
		}
		if seen[key] {
			return l, fmt.Errorf("labels: key %q appears twice; list all its values in one group: %s=a,b", key, key)
		}
		seen[key] = true
		lk := labelKey{key: key}
		values := map[string]bool{}
		for _, c := range strings.Split(rest, ",") {
			choices, err := parseChoice(key, strings.TrimSpace(c))
			if err != nil {
				return l, err
			}
			for _, ch := range choices {
				if values[ch.value] {
					return l, fmt.Errorf("labels: %s=%s is listed twice; give it one weight", key, ch.value)
				}
				values[ch.value] = true
			}
			total += len(choices)
			if total > maxLabelChoices {
				return l, fmt.Errorf("labels: more than %d values in all; use fewer or smaller ranges", maxLabelChoices)
			}
			lk.choices = append(lk.choices, choices...)
		}
		l.keys = append(l.keys, lk)
	}
	return l, nil
}

func parseChoice(key, c string) ([]labelChoice, error) {
	value, w, hasWeight := strings.Cut(c, ":")
	weight := 1.0
	if hasWeight {
		var err error
		weight, err = strconv.ParseFloat(strings.TrimSpace(w), 64)
		if err != nil || !(weight > 0) || weight > 1e9 {
			return nil, fmt.Errorf("labels: %s=%s: weight %q must be a positive number, e.g. %s=%s:60", key, c, w, key, value)
		}
	}
	value = strings.TrimSpace(value)
	if m := rangeRE.FindStringSubmatch(value); m != nil {
		if m[1] != m[3] {
			return nil, fmt.Errorf("labels: %s=%s: both ends of a range need the same prefix, e.g. s1..s20", key, value)
		}
		lo, err1 := strconv.Atoi(m[2])
		hi, err2 := strconv.Atoi(m[4])
		if err1 != nil || err2 != nil || lo > hi || hi-lo >= maxLabelChoices {
			return nil, fmt.Errorf("labels: %s=%s: want a range from low to high of at most %d values, e.g. s1..s20", key, value, maxLabelChoices)
		}
		width := 0
		if len(m[2]) > 1 && m[2][0] == '0' {
			width = len(m[2]) // s01..s20 keeps two digits
		}
		out := make([]labelChoice, 0, hi-lo+1)
		for i := lo; i <= hi; i++ {
			v := fmt.Sprintf("%s%0*d", m[1], width, i)
			if !labelValueRE.MatchString(v) {
				return nil, fmt.Errorf("labels: %s=%s: value %q: use up to 63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit", key, value, v)
			}
			out = append(out, labelChoice{value: v, weight: weight})
		}
		return out, nil
	}
	if value == "" || !labelValueRE.MatchString(value) {
		return nil, fmt.Errorf("labels: %s=%q: use 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit", key, value)
	}
	return []labelChoice{{value: value, weight: weight}}, nil
}

// String gives the distribution back in ParseLabels' syntax, ranges
// expanded.
func (l Labels) String() string {
	groups := make([]string, 0, len(l.keys))
	for _, k := range l.keys {
		cs := make([]string, len(k.choices))
		for i, c := range k.choices {
			cs[i] = c.value + ":" + strconv.FormatFloat(c.weight, 'g', -1, 64)
		}
		groups = append(groups, k.key+"="+strings.Join(cs, ","))
	}
	return strings.Join(groups, ";")
}

// Assign gives n devices their labels. Each key's values are dealt out in
// proportion to their weights, as exactly as n allows (largest remainder),
// to devices picked in a random order drawn from seed; keys are dealt
// independently. The same labels, n and seed give the same result.
func (l Labels) Assign(n int, seed uint64) []map[string]string {
	out := make([]map[string]string, n)
	for i := range out {
		out[i] = make(map[string]string, len(l.keys))
	}
	for ki, k := range l.keys {
		counts := apportion(n, k.choices)
		order := permutation(n, seed, uint64(ki)+1)
		next := 0
		for ci, c := range k.choices {
			for range counts[ci] {
				out[order[next]][k.key] = c.value
				next++
			}
		}
	}
	return out
}

// apportion splits n among the choices by weight with the largest
// remainder method, so the counts add up to n and each is within one of
// its exact share.
func apportion(n int, choices []labelChoice) []int {
	total := 0.0
	for _, c := range choices {
		total += c.weight
	}
	counts := make([]int, len(choices))
	type rem struct {
		i int
		r float64
	}
	rems := make([]rem, len(choices))
	given := 0
	for i, c := range choices {
		exact := float64(n) * c.weight / total
		counts[i] = int(exact)
		given += counts[i]
		rems[i] = rem{i, exact - float64(counts[i])}
	}
	sort.SliceStable(rems, func(a, b int) bool { return rems[a].r > rems[b].r })
	for j := 0; given < n; j++ {
		counts[rems[j%len(rems)].i]++
		given++
	}
	return counts
}

// permutation returns 0..n-1 in an order drawn from (seed, stream).
func permutation(n int, seed, stream uint64) []int {
	r := rand.New(rand.NewPCG(seed, stream))
	p := make([]int, n)
	for i := range p {
		p[i] = i
	}
	r.Shuffle(n, func(i, j int) { p[i], p[j] = p[j], p[i] })
	return p
}

// pick returns exactly round(frac*n) distinct indices out of n, drawn from
// (seed, stream), as a set.
func pick(n int, frac float64, seed, stream uint64) map[int]bool {
	k := int(frac*float64(n) + 0.5)
	k = min(max(k, 0), n)
	out := make(map[int]bool, k)
	for _, i := range permutation(n, seed, stream)[:k] {
		out[i] = true
	}
	return out
}
