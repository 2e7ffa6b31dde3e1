package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"sort"
	"strconv"
	"strings"
)

// goBench is one Go benchmark's medians over -count runs.
type goBench struct {
	Pkg, Name string
	Runs      int
	// Metrics holds the median of each unit: ns/op, B/op, allocs/op and
	// whatever the benchmark reports itself.
	Metrics map[string]float64
}

// maxGoBenchOutput caps what is read from go test.
const maxGoBenchOutput = 32 << 20

func (e *env) goBenchmarks(ctx context.Context) ([]goBench, error) {
	args := []string{"test", "-run", "^$", "-bench", ".", "-benchmem", "-count", strconv.Itoa(e.cfg.goCount), "-timeout", "60m"}
	if e.cfg.goBenchtime != "" {
		args = append(args, "-benchtime", e.cfg.goBenchtime)
	}
	args = append(args, strings.Fields(e.cfg.goPkgs)...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = e.cfg.root
	var out limitedBuffer
	out.max = maxGoBenchOutput
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := cmd.Run()
	benches, failed := parseGoBench(bytes.NewReader(out.Bytes()))
	var err error
	if runErr != nil || len(failed) > 0 {
		err = fmt.Errorf("go %s: %v; failed: %s", strings.Join(args, " "), runErr, strings.Join(failed, ", "))
	}
	return benches, err
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := l.max - l.Len(); room > 0 {
		l.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// parseGoBench reads `go test -bench` output: the benchmarks with the
// median of each metric over their runs, in the order first seen, and
// the packages or benchmarks that failed.
func parseGoBench(r io.Reader) ([]goBench, []string) {
	type key struct{ pkg, name string }
	var order []key
	samples := map[key]map[string][]float64{}
	runs := map[key]int{}
	var failed []string
	pkg := ""
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if p, ok := strings.CutPrefix(line, "pkg: "); ok {
			pkg = strings.TrimSpace(p)
			continue
		}
		if strings.HasPrefix(line, "--- FAIL: Benchmark") || strings.HasPrefix(line, "FAIL\t") {
			failed = append(failed, strings.TrimSpace(strings.TrimPrefix(strings.TrimPrefix(line, "--- FAIL: "), "FAIL\t")))
			continue
		}
		if !strings.HasPrefix(line, "Benchmark") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 4 || len(f)%2 != 0 {
			continue
		}
		if _, err := strconv.ParseInt(f[1], 10, 64); err != nil {
			continue // "BenchmarkX-2  --- FAIL" and the like
		}
		k := key{pkg, trimProcs(f[0])}
		if samples[k] == nil {
			samples[k] = map[string][]float64{}
			order = append(order, k)
		}
		ok := false
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			samples[k][f[i+1]] = append(samples[k][f[i+1]], v)
			ok = true
		}
		if ok {
			runs[k]++
		}
	}
	out := make([]goBench, 0, len(order))
	for _, k := range order {
		b := goBench{Pkg: k.pkg, Name: k.name, Runs: runs[k], Metrics: map[string]float64{}}
		for unit, vs := range samples[k] {
			b.Metrics[unit] = medianFloat(vs)
		}
		out = append(out, b)
	}
	return out, failed
}

// trimProcs drops the -GOMAXPROCS suffix of a benchmark name.
func trimProcs(name string) string {
	if i := strings.LastIndexByte(name, '-'); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			return name[:i]
		}
	}
	return name
}

func medianFloat(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
