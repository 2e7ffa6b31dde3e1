package sim

import (
	"context"
	"runtime"
	"testing"
	"time"
)

// BenchmarkLabelsAssign deals a realistic label distribution to ten
// thousand devices, as New does.
func BenchmarkLabelsAssign(b *testing.B) {
	l, err := ParseLabels("region=eu:60,us:30,apac:10;hw=jetson,rpi5,x86;site=s1..s200")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		l.Assign(10_000, 1)
	}
}

// BenchmarkJoin starts 200 simulated devices against an in-process broker
// and waits until each has said hello and reported its state: the cost
// of bringing a device up, and what an idle one holds (the heap of the
// devices and of their broker sessions, which share this process).
func BenchmarkJoin(b *testing.B) {
	const n = 200
	broker := startBroker(b)
	var perDevice float64
	for b.Loop() {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		s, err := New(Options{Agents: n, Broker: broker, Controller: "http://127.0.0.1:1", StartRate: 1e6, AllowUnsigned: true})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		wctx, wcancel := context.WithTimeout(ctx, time.Minute)
		if err := s.WaitJoined(wctx); err != nil {
			b.Fatal(err)
		}
		wcancel()
		b.StopTimer()
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		perDevice = float64(after.HeapInuse+after.StackInuse-before.HeapInuse-before.StackInuse) / n
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/device")
	b.ReportMetric(perDevice/1024, "KiB/device")
}
