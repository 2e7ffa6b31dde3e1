package testmodels

import (
	"context"
	"encoding/binary"
	"math"
	"reflect"
	"testing"

	"github.com/edgefleet/edgefleet/models/build"
)

func root(t *testing.T) string {
	t.Helper()
	r, err := build.FindRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestList(t *testing.T) {
	list, err := List(root(t))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{Slow, Flaky, Loop, MemBomb, Trap, Wrong}
	if len(list) != 1 || list[0].Name != "grid-anomaly" {
		t.Fatalf("test models %+v, want grid-anomaly's variants", list)
	}
	got := map[string]bool{}
	for _, v := range list[0].Versions {
		got[v] = true
	}
	for _, v := range want {
		if !got[v] || !Has(root(t), "grid-anomaly", v) {
			t.Errorf("version %s missing from %v", v, list[0].Versions)
		}
	}
	if len(got) != len(want) || Has(root(t), "grid-anomaly", "1.0.0") {
		t.Errorf("versions %v, want exactly %v", list[0].Versions, want)
	}
	if _, err := List(t.TempDir()); err == nil {
		t.Error("a root without test models listed fine")
	}
}

func TestBuildRefusals(t *testing.T) {
	b := &build.Builder{Root: root(t)}
	if _, err := Build(context.Background(), b, "grid-anomaly", "9.9.9-nothing"); err == nil {
		t.Error("unknown version built")
	}
	if _, err := Build(context.Background(), b, "no-such-model", Slow); err == nil {
		t.Error("unknown model built")
	}
}

// TestFlakyFails: deterministic, and about FlakyPercent of varied inputs.
func TestFlakyFails(t *testing.T) {
	n, failed := 3000, 0
	for i := 0; i < n; i++ {
		b := binary.LittleEndian.AppendUint32(nil, math.Float32bits(float32(i)))
		if FlakyFails(b) != FlakyFails(append([]byte(nil), b...)) {
			t.Fatal("not deterministic")
		}
		if FlakyFails(b) {
			failed++
		}
	}
	if rate := float64(failed) / float64(n); math.Abs(rate-FlakyPercent/100.0) > 0.04 {
		t.Fatalf("fails %.1f%%, want about %d%%", 100*rate, FlakyPercent)
	}
	if !reflect.DeepEqual(TriggerRow, [4]float32{230, 10, 50, -1000}) {
		t.Fatal("TriggerRow changed: keep it equal to the guest's TriggerTempC")
	}
}
