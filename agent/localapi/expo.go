package localapi

import (
	"io"
	"math"
	"strconv"
	"strings"
)

// Exposition writes metrics in the Prometheus text exposition format,
// version 0.0.4, by hand: the format is a few lines of rules, not worth a
// dependency on the device. A family is written as Family followed by its
// samples; label values are escaped as the format says (backslash, double
// quote, newline). The first write error is kept and stops later writes.
type Exposition struct {
	w   io.Writer
	buf []byte
	err error
}

// NewExposition returns an Exposition writing to w.
func NewExposition(w io.Writer) *Exposition { return &Exposition{w: w} }

// Err returns the first write error.
func (e *Exposition) Err() error { return e.err }

// Family starts a metric family: its HELP and TYPE lines. typ is counter,
// gauge, histogram or untyped.
func (e *Exposition) Family(name, typ, help string) {
	b := e.buf[:0]
	b = append(b, "# HELP "...)
	b = append(b, name...)
	b = append(b, ' ')
	b = append(b, strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(help)...)
	b = append(b, "\n# TYPE "...)
	b = append(b, name...)
	b = append(b, ' ')
	b = append(b, typ...)
	b = append(b, '\n')
	e.write(b)
}

// Sample writes one sample; labels are name, value pairs.
func (e *Exposition) Sample(name string, labels []string, v float64) {
	b := appendSeries(e.buf[:0], name, labels, "", "")
	b = append(b, ' ')
	b = appendValue(b, v)
	b = append(b, '\n')
	e.write(b)
}

// Histogram writes the _bucket, _sum and _count samples of one histogram.
// bounds are the upper bounds of the buckets but the last (+Inf); counts
// are per bucket, not cumulative, len(bounds)+1 of them, as the agent's
// aggregates hold them.
func (e *Exposition) Histogram(name string, labels []string, bounds []float64, counts []uint64, sum float64) {
	var cum uint64
	for i, c := range counts {
		cum += c
		le := "+Inf"
		if i < len(bounds) {
			le = strconv.FormatFloat(bounds[i], 'g', -1, 64)
		}
		b := appendSeries(e.buf[:0], name+"_bucket", labels, "le", le)
		b = append(b, ' ')
		b = strconv.AppendUint(b, cum, 10)
		b = append(b, '\n')
		e.write(b)
	}
	e.Sample(name+"_sum", labels, sum)
	b := appendSeries(e.buf[:0], name+"_count", labels, "", "")
	b = append(b, ' ')
	b = strconv.AppendUint(b, cum, 10)
	b = append(b, '\n')
	e.write(b)
}

func (e *Exposition) write(b []byte) {
	e.buf = b
	if e.err != nil {
		return
	}
	_, e.err = e.w.Write(b)
}

func appendSeries(b []byte, name string, labels []string, extraK, extraV string) []byte {
	b = append(b, name...)
	if len(labels) < 2 && extraK == "" {
		return b
	}
	b = append(b, '{')
	first := true
	label := func(k, v string) {
		if !first {
			b = append(b, ',')
		}
		first = false
		b = append(b, k...)
		b = append(b, `="`...)
		for i := 0; i < len(v); i++ {
			switch c := v[i]; c {
			case '\\':
				b = append(b, `\\`...)
			case '"':
				b = append(b, `\"`...)
			case '\n':
				b = append(b, `\n`...)
			default:
				b = append(b, c)
			}
		}
		b = append(b, '"')
	}
	for i := 0; i+1 < len(labels); i += 2 {
		label(labels[i], labels[i+1])
	}
	if extraK != "" {
		label(extraK, extraV)
	}
	return append(b, '}')
}

func appendValue(b []byte, v float64) []byte {
	switch {
	case math.IsInf(v, 1):
		return append(b, "+Inf"...)
	case math.IsInf(v, -1):
		return append(b, "-Inf"...)
	case math.IsNaN(v):
		return append(b, "NaN"...)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}
