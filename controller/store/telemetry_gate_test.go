package store

import (
	"context"
	"fmt"
	"testing"
	"time"
)

func TestInstallSpans(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	sec := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Second) }
	type ev struct {
		kind, slot string
		at         int
	}
	devices := map[string][]ev{
		// A whole install, then a health report (not an install).
		"whole": {{"downloading", "a", 10}, {"verified", "a", 20}, {"activated", "a", 30}, {"healthy", "a", 90}},
		// Two slots at once, one failing; the agent restarting.
		"slots": {{"downloading", "a", 10}, {"verified", "b", 15}, {"failed", "b", 25}, {"activated", "a", 40}, {"agent-restarting", "@agent", 300}},
		// An install under way at the end of the window.
		"open": {{"verified", "a", 100}},
		// An install whose start was long ago: capped, then its end alone.
		"stale": {{"downloading", "a", -3000}, {"activated", "a", 100}},
		// An install well before the window: not returned.
		"before": {{"downloading", "a", -1500}, {"activated", "a", -1400}},
		// Events, but none of an install.
		"quiet": {{"healthy", "a", 50}},
	}
	var ids []string
	for id, evs := range devices {
		ids = append(ids, id)
		for _, e := range evs {
			if err := s.AppendEvent(ctx, Event{DeviceID: id, Kind: e.kind, Slot: e.slot, At: sec(e.at)}, sec(e.at)); err != nil {
				t.Fatal(err)
			}
		}
	}
	got, err := s.InstallSpans(ctx, append(ids, "unknown"), sec(0), sec(600))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"whole":  "[{a 10 30}]",
		"slots":  "[{b 15 25} {a 10 40} {@agent 300 300}]",
		"open":   "[{a 100 600}]",
		"stale":  "[{a 100 100}]",
		"before": "[]",
		"quiet":  "[]",
	}
	for id, w := range want {
		var spans []string
		for _, sp := range got[id] {
			spans = append(spans, fmt.Sprintf("{%s %d %d}", sp.Slot, int(sp.From.Sub(t0).Seconds()), int(sp.To.Sub(t0).Seconds())))
		}
		if g := fmt.Sprintf("%v", spans); g != w && !(w == "[]" && len(spans) == 0) {
			t.Errorf("%s: spans %s, want %s", id, g, w)
		}
	}
	// An install open past MaxInstallSpan ends there.
	long, err := s.InstallSpans(ctx, []string{"open"}, sec(0), sec(3600))
	if err != nil || len(long["open"]) != 1 || !long["open"][0].To.Equal(sec(100).Add(MaxInstallSpan)) {
		t.Fatalf("open install over an hour: %+v, %v", long, err)
	}
	sp := InstallSpan{From: sec(10), To: sec(30)}
	for _, c := range []struct {
		from, to int
		want     bool
	}{{0, 10, false}, {0, 11, true}, {30, 90, true}, {31, 90, false}, {15, 20, true}} {
		if got := sp.Overlaps(sec(c.from), sec(c.to)); got != c.want {
			t.Errorf("[10s, 30s] overlaps [%ds, %ds) = %v", c.from, c.to, got)
		}
	}
	if none, err := s.InstallSpans(ctx, nil, sec(0), sec(10)); err != nil || len(none) != 0 {
		t.Fatalf("no devices: %v %v", none, err)
	}
}
