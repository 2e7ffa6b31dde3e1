// Package metrics holds the controller's counters and writes them in the
// Prometheus text exposition format. A handful of hand-written counters do
// not justify the Prometheus client library and its dependency tree.
package metrics

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Registry holds named metrics and renders them. The zero value is not
// usable; call NewRegistry.
type Registry struct {
	mu      sync.Mutex
	metrics map[string]metric
}

type metric interface {
	write(w io.Writer, name string) error
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{metrics: map[string]metric{}}
}

// Counter is a monotonically increasing count.
type Counter struct {
	help string
	v    atomic.Uint64
}

// Inc adds one.
func (c *Counter) Inc() { c.v.Add(1) }

// Add adds n.
func (c *Counter) Add(n uint64) { c.v.Add(n) }

// Value returns the current count.
func (c *Counter) Value() uint64 { return c.v.Load() }

func (c *Counter) write(w io.Writer, name string) error {
	_, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, c.help, name, name, c.Value())
	return err
}

// CounterVec is a family of counters told apart by the value of one label.
type CounterVec struct {
	help  string
	label string
	mu    sync.Mutex
	byVal map[string]*Counter
}

// With returns the counter for one label value, creating it at zero.
func (v *CounterVec) With(value string) *Counter {
	v.mu.Lock()
	defer v.mu.Unlock()
	c, ok := v.byVal[value]
	if !ok {
		c = &Counter{}
		v.byVal[value] = c
	}
	return c
}

func (v *CounterVec) write(w io.Writer, name string) error {
	v.mu.Lock()
	vals := make([]string, 0, len(v.byVal))
	for k := range v.byVal {
		vals = append(vals, k)
	}
	v.mu.Unlock()
	slices.Sort(vals)
	if _, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n", name, v.help, name); err != nil {
		return err
	}
	for _, val := range vals {
		if _, err := fmt.Fprintf(w, "%s{%s=%s} %d\n", name, v.label, quote(val), v.With(val).Value()); err != nil {
			return err
		}
	}
	return nil
}

// gaugeFunc is a gauge read when the metrics are rendered.
type gaugeFunc struct {
	help string
	fn   func() float64
}

func (g gaugeFunc) write(w io.Writer, name string) error {
	_, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n%s %s\n", name, g.help, name, name, strconv.FormatFloat(g.fn(), 'g', -1, 64))
	return err
}

// Counter returns the counter called name, creating it on first use. It
// panics if name is already registered as another kind of metric: that is a
// programming error found by the first test that runs the code.
func (r *Registry) Counter(name, help string) *Counter {
	m := r.register(name, func() metric { return &Counter{help: help} })
	return m.(*Counter)
}

// CounterVec returns the counter family called name with the given label,
// creating it on first use.
func (r *Registry) CounterVec(name, help, label string) *CounterVec {
	m := r.register(name, func() metric { return &CounterVec{help: help, label: label, byVal: map[string]*Counter{}} })
	return m.(*CounterVec)
}

// GaugeFunc registers a gauge whose value fn returns at render time. A
// second registration under the same name replaces the function.
func (r *Registry) GaugeFunc(name, help string, fn func() float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.metrics[name] = gaugeFunc{help: help, fn: fn}
}

func (r *Registry) register(name string, mk func() metric) metric {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m, ok := r.metrics[name]; ok {
		return m
	}
	m := mk()
	r.metrics[name] = m
	return m
}

// WriteText writes every metric, sorted by name, in the Prometheus text
// format (version 0.0.4).
func (r *Registry) WriteText(w io.Writer) error {
	r.mu.Lock()
	names := make([]string, 0, len(r.metrics))
	for n := range r.metrics {
		names = append(names, n)
	}
	ms := make(map[string]metric, len(r.metrics))
	for n, m := range r.metrics {
		ms[n] = m
	}
	r.mu.Unlock()
	slices.Sort(names)
	for _, n := range names {
		if err := ms[n].write(w, n); err != nil {
			return err
		}
	}
	return nil
}

// ServeHTTP serves the metrics for GET /metrics.
func (r *Registry) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	_ = r.WriteText(w)
}

// quote escapes a label value as the text format requires.
func quote(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	s = strings.ReplaceAll(s, "\n", `\n`)
	s = strings.ReplaceAll(s, `"`, `\"`)
	return `"` + s + `"`
}
