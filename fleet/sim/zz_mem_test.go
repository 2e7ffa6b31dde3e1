package sim

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"
)

func rss() int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n * 1024
		}
	}
	return 0
}

func TestZZMem(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("N"))
	if n == 0 {
		t.Skip()
	}
	runtime.GC()
	r0 := rss()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0 := runtime.NumGoroutine()
	s, err := New(Options{Agents: n, Broker: "tcp://127.0.0.1:18830", Controller: "http://127.0.0.1:1", StartRate: 5000})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	start := time.Now()
	if err := s.WaitJoined(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("joined in %s", time.Since(start))
	time.Sleep(3 * time.Second)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	t.Logf("agents %d: rss/agent %.1f KB heap/agent %.1f KB stack/agent %.1f KB goroutines/agent %.1f",
		n, float64(rss()-r0)/float64(n)/1024, float64(ms.HeapInuse-ms0.HeapInuse)/float64(n)/1024,
		float64(ms.StackInuse-ms0.StackInuse)/float64(n)/1024, float64(runtime.NumGoroutine()-g0)/float64(n))
	f, _ := os.Create("/tmp/heap.prof")
	pprof.WriteHeapProfile(f)
	f.Close()
	f, _ = os.Create("/tmp/gor.txt")
	pprof.Lookup("goroutine").WriteTo(f, 1)
	f.Close()
	cancel()
	<-done
}
