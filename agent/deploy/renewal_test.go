package deploy

import (
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
)

func TestOrdersGeneration(t *testing.T) {
	cases := []struct {
		gen, renews, want uint64
	}{
		{7, 0, 7},
		{7, 3, 3},
		{7, 7, 7}, // not older: no renewal (DecodeDesired refuses it)
		{7, 9, 7},
	}
	for _, c := range cases {
		if got := OrdersGeneration(&pb.DesiredState{Generation: c.gen, RenewsGeneration: c.renews}); got != c.want {
			t.Errorf("generation %d renewing %d: orders generation %d, want %d", c.gen, c.renews, got, c.want)
		}
	}
	for _, renews := range []uint64{5, 6} {
		sd := signedWith(t, &pb.DesiredState{DeviceId: "dev-1", Generation: 5, RenewsGeneration: renews})
		if _, err := DecodeDesired(sd); err == nil || !strings.Contains(err.Error(), "not older") {
			t.Errorf("generation 5 renewing %d decoded: %v", renews, err)
		}
	}
}

func signedWith(t *testing.T, ds *pb.DesiredState) *pb.SignedDesiredState {
	t.Helper()
	return directorSigned(t, nil, ds)
}

// TestRenewalKeepsRefusals: a renewal (the controller re-issuing a
// desired state only to push its expiry back, controller/director's
// Renewer) passes the agent's real checks (director signature, device,
// generation, expiry) and is accepted as the new generation, but repeats
// its order: a downgrade the agent refused under the order is not tried
// again under its renewals, while a new order of the same downgrade is.
// The manager's passes run on the test's goroutine (no Run), so what each
// pass did is known when it returns.
func TestRenewalKeepsRefusals(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	release, director := newKey(t), newKey(t)
	var clock atomic.Int64
	clock.Store(time.Now().UnixMilli())
	ev := newEvents()
	m, err := New(Options{DeviceID: "dev-1", DataDir: f.dir, Host: f.host, Controller: f.srv.URL, Reporter: ev,
		Now:    func() time.Time { return time.UnixMilli(clock.Load()) },
		Guard:  &TrustGuard{Release: trust.NewKeySet(pubOf(release)), Director: trust.NewKeySet(pubOf(director)), DataDir: f.dir},
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := m.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(t.Context()) })
	v1 := f.publish("default", "grid-anomaly", "1.0.0", encode(t, signBundle(t, modeltest.ExampleBundle(t, "grid-anomaly", "1.0.0"), release)))
	v2 := f.publish("default", "grid-anomaly", "1.1.0", encode(t, signBundle(t, modeltest.ExampleBundle(t, "grid-anomaly", "1.1.0"), release)))
	offer := func(gen, renews uint64, a *pb.SlotAssignment) {
		t.Helper()
		ds := &pb.DesiredState{DeviceId: "dev-1", Generation: gen, RenewsGeneration: renews, IssuedAtUnixMs: clock.Load(),
			ExpiresAtUnixMs: clock.Load() + (30 * 24 * time.Hour).Milliseconds(), Slots: []*pb.SlotAssignment{a}}
		m.accept(ctx, directorSigned(t, director, ds))
		if m.Generation() != gen {
			t.Fatalf("generation %d (renewing %d) not accepted: at %d; events %v", gen, renews, m.Generation(), ev.all())
		}
		m.reconcile(ctx)
	}
	failed := func(gen uint64) int {
		n := 0
		for _, e := range ev.all() {
			if e.GetKind() == pb.EventKind_EVENT_KIND_FAILED && e.GetGeneration() == gen {
				n++
			}
		}
		return n
	}

	offer(1, 0, v2)
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
		t.Fatalf("%s answers after generation 1", v)
	}
	// The order: a downgrade without a rollback order, refused.
	offer(2, 0, v1)
	if failed(2) != 1 {
		t.Fatalf("the downgrade of generation 2 was not refused: %v", ev.all())
	}
	// Its renewals, days later: accepted, nothing retried.
	for gen := uint64(3); gen <= 4; gen++ {
		clock.Add((23 * 24 * time.Hour).Milliseconds())
		offer(gen, 2, v1)
		if n := failed(gen); n != 0 {
			t.Fatalf("renewal %d of generation 2 tried the refused downgrade again (%d FAILED)", gen, n)
		}
		if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
			t.Fatalf("%s answers after renewal %d", v, gen)
		}
	}
	for _, e := range ev.all() {
		if e.GetKind() == pb.EventKind_EVENT_KIND_REFUSED {
			t.Fatalf("a renewal was refused: %v", e)
		}
	}
	// A new order of the same downgrade is tried (and refused) again.
	offer(5, 0, v1)
	if failed(5) != 1 {
		t.Fatalf("a new order did not retry the downgrade: %v", ev.all())
	}
}
