package director

import (
	"context"
	"crypto/ed25519"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/broker"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// fakeClock is the renewal tests' clock: days pass at a call.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// switchable is a Publisher that fails while down, to stand for a broker
// outage (or a crash) between commit and publish.
type switchable struct {
	Publisher
	down bool
	mu   sync.Mutex
}

func (s *switchable) PublishAsync(topic string, payload []byte, retained bool, done func(error)) {
	s.mu.Lock()
	down := s.down
	s.mu.Unlock()
	if down {
		done(errors.New("broker unreachable"))
		return
	}
	s.Publisher.PublishAsync(topic, payload, retained, done)
}

func (s *switchable) setDown(v bool) {
	s.mu.Lock()
	s.down = v
	s.mu.Unlock()
}

type renewFixture struct {
	t   *testing.T
	st  *store.Store
	b   *broker.Broker
	pub *switchable
	clk *fakeClock
	d   *Director
	key ed25519.PrivateKey
}

var renewT0 = time.UnixMilli(1_800_000_000_000).UTC()

// newRenewFixture: a real SQLite store with devices dev-1..dev-3 and
// model m@1.0.0, the real embedded broker, and a director on a fake clock
// signing with a real key, 30-day expiry.
func newRenewFixture(t *testing.T) *renewFixture {
	t.Helper()
	ctx := t.Context()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "c.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	b, err := broker.New(broker.Options{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	bctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(bctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("broker: %v", err)
		}
	})
	if err := b.Open(); err != nil {
		t.Fatal(err)
	}
	_, priv, err := trust.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	f := &renewFixture{t: t, st: st, b: b, pub: &switchable{Publisher: b}, clk: &fakeClock{t: renewT0}, key: priv}
	f.d = New(Options{Store: st, Publisher: f.pub, Key: priv, Now: f.clk.Now, Expiry: DefaultExpiry})
	if _, _, err := st.PutModel(ctx, store.Model{Name: "m", Version: "1.0.0", Digest: strings.Repeat("a", 64), Size: 10, Manifest: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"dev-1", "dev-2", "dev-3"} {
		if err := st.UpsertHello(ctx, store.Hello{ID: id, AgentVersion: "1.0.0", At: renewT0}); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f *renewFixture) assign(at time.Time, ids ...string) {
	f.t.Helper()
	f.clk.set(at)
	m := store.Model{Name: "m", Version: "1.0.0", Digest: strings.Repeat("a", 64), Size: 10}
	res, err := f.d.Assign(f.t.Context(), ids, "", m)
	if err != nil {
		f.t.Fatal(err)
	}
	for _, r := range res {
		if r.PublishErr != nil {
			f.t.Fatal(r.PublishErr)
		}
	}
}

// retained returns the desired state the broker retains for id, checked
// the way an agent checks it: envelope, device, signature by the director
// key over the exact bytes.
func (f *renewFixture) retained(id string) *pb.DesiredState {
	f.t.Helper()
	var payload []byte
	topic := wire.Topic(id, wire.KindDesired)
	if err := f.b.SubscribeInline(topic, func(_ string, p []byte, retained bool) {
		if retained {
			payload = append([]byte(nil), p...)
		}
	}); err != nil {
		f.t.Fatal(err)
	}
	if payload == nil {
		f.t.Fatalf("no desired state retained for %s", id)
	}
	env, err := wire.Open(topic, payload)
	if err != nil {
		f.t.Fatal(err)
	}
	sd := env.GetDesired()
	ks := trust.NewKeySet(f.key.Public().(ed25519.PublicKey))
	if err := ks.Verify(trust.DomainDesiredState, sd.GetDesired(), []trust.Signature{{KeyID: sd.GetKeyId(), Sig: sd.GetSignature()}}); err != nil {
		f.t.Fatalf("%s: retained desired state does not verify: %v", id, err)
	}
	var ds pb.DesiredState
	if err := proto.Unmarshal(sd.GetDesired(), &ds); err != nil {
		f.t.Fatal(err)
	}
	if ds.GetDeviceId() != id {
		f.t.Fatalf("retained desired state of %s names %s", id, ds.GetDeviceId())
	}
	return &ds
}

func day(n int) time.Duration { return time.Duration(n) * 24 * time.Hour }

// TestRenewerRenewsBeforeExpiry: a desired state is renewed once its
// expiry is within the horizon, not before; the renewal is the next
// generation with the same slots, a fresh expiry, the generation whose
// orders it repeats, a valid signature, and it is what the broker retains.
// A renewal of a renewal still names the original order.
func TestRenewerRenewsBeforeExpiry(t *testing.T) {
	f := newRenewFixture(t)
	ctx := t.Context()
	f.assign(renewT0, "dev-1", "dev-2")
	f.assign(renewT0.Add(day(10)), "dev-3")
	first := f.retained("dev-1")
	r, err := f.d.NewRenewer(RenewOptions{Store: f.st, Before: day(7), Batch: 1})
	if err != nil {
		t.Fatal(err)
	}

	// Day 20: dev-1 and dev-2 have 10 days left, dev-3 20.
	f.clk.set(renewT0.Add(day(20)))
	if n, err := r.Once(ctx); err != nil || n != 0 {
		t.Fatalf("day 20: renewed %d (%v), want none", n, err)
	}
	// Day 24: 6 days left for dev-1 and dev-2 (in two batches of one).
	now := renewT0.Add(day(24))
	f.clk.set(now)
	if n, err := r.Once(ctx); err != nil || n != 2 {
		t.Fatalf("day 24: renewed %d (%v), want 2", n, err)
	}
	for _, id := range []string{"dev-1", "dev-2"} {
		got := f.retained(id)
		if got.GetGeneration() != first.GetGeneration()+1 || got.GetRenewsGeneration() != first.GetGeneration() {
			t.Fatalf("%s: renewal is generation %d renewing %d; want %d renewing %d", id, got.GetGeneration(), got.GetRenewsGeneration(), first.GetGeneration()+1, first.GetGeneration())
		}
		if exp := time.UnixMilli(got.GetExpiresAtUnixMs()); !exp.Equal(now.Add(DefaultExpiry)) || got.GetIssuedAtUnixMs() != now.UnixMilli() {
			t.Fatalf("%s: renewal issued %d expires %v; want issued now, expiring %v", id, got.GetIssuedAtUnixMs(), exp, now.Add(DefaultExpiry))
		}
		if len(got.GetSlots()) != 1 || !proto.Equal(got.GetSlots()[0], first.GetSlots()[0]) {
			t.Fatalf("%s: renewal changed the slots: %v, was %v", id, got.GetSlots(), first.GetSlots())
		}
		stored, err := f.st.DesiredState(ctx, id)
		if err != nil || stored.Generation != got.GetGeneration() || len(stored.Slots) != 1 || stored.Slots[0].Version != "1.0.0" {
			t.Fatalf("%s: stored %+v, %v", id, stored, err)
		}
	}
	if got := f.retained("dev-3"); got.GetRenewsGeneration() != 0 {
		t.Fatalf("dev-3 renewed with 16 days left: %v", got)
	}
	if n, err := r.Once(ctx); err != nil || n != 0 {
		t.Fatalf("second pass on day 24: renewed %d (%v), want none", n, err)
	}

	// Day 48: the renewals have 6 days left; dev-3 (day 40) expired
	// already: both renewed, a renewal of a renewal naming the order.
	f.clk.set(renewT0.Add(day(48)))
	if n, err := r.Once(ctx); err != nil || n != 3 {
		t.Fatalf("day 48: renewed %d (%v), want 3", n, err)
	}
	if got := f.retained("dev-1"); got.GetGeneration() != first.GetGeneration()+2 || got.GetRenewsGeneration() != first.GetGeneration() {
		t.Fatalf("second renewal %d renews %d; want %d renewing the order %d", got.GetGeneration(), got.GetRenewsGeneration(), first.GetGeneration()+2, first.GetGeneration())
	}
	if v := f.d.opts.Metrics.Counter("edgefleet_controller_desired_renewed_total", "").Value(); v != 5 {
		t.Fatalf("renewed counter %d, want 5", v)
	}
}

// TestRenewerPersistsBeforePublishing: a renewal the broker does not
// take is committed anyway, stays unpublished, and goes out with the
// director's re-publish after a reconnect.
func TestRenewerPersistsBeforePublishing(t *testing.T) {
	f := newRenewFixture(t)
	ctx := t.Context()
	f.assign(renewT0, "dev-1")
	first := f.retained("dev-1")
	r, err := f.d.NewRenewer(RenewOptions{Store: f.st})
	if err != nil {
		t.Fatal(err)
	}
	f.clk.set(renewT0.Add(day(25)))
	f.pub.setDown(true)
	if n, err := r.Once(ctx); err != nil || n != 1 {
		t.Fatalf("renewed %d (%v), want 1 committed", n, err)
	}
	pending, err := f.st.UnpublishedDesired(ctx)
	if err != nil || len(pending) != 1 || pending[0].Generation != first.GetGeneration()+1 {
		t.Fatalf("unpublished after a failed publish: %+v, %v", pending, err)
	}
	if got := f.retained("dev-1"); got.GetGeneration() != first.GetGeneration() {
		t.Fatalf("the broker has generation %d before the re-publish", got.GetGeneration())
	}
	f.pub.setDown(false)
	if err := f.d.RepublishPending(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.retained("dev-1"); got.GetGeneration() != first.GetGeneration()+1 || got.GetRenewsGeneration() != first.GetGeneration() {
		t.Fatalf("after the re-publish the broker retains %v", got)
	}
}

// TestRenewerOptions: a horizon as long as the expiry is refused; with
// expiry off nothing is ever due.
func TestRenewerOptions(t *testing.T) {
	d := New(Options{Expiry: day(5)})
	if _, err := d.NewRenewer(RenewOptions{Store: &store.Store{}}); err == nil || !strings.Contains(err.Error(), "renew them less early") {
		t.Fatalf("a 7-day horizon on a 5-day expiry: %v", err)
	}
	if _, err := d.NewRenewer(RenewOptions{}); err == nil {
		t.Fatal("a renewer without a store")
	}

	f := newRenewFixture(t)
	f.d = New(Options{Store: f.st, Publisher: f.pub, Key: f.key, Now: f.clk.Now, Expiry: -1})
	f.assign(renewT0, "dev-1")
	r, err := f.d.NewRenewer(RenewOptions{Store: f.st})
	if err != nil {
		t.Fatal(err)
	}
	f.clk.set(renewT0.Add(day(400)))
	if n, err := r.Once(t.Context()); err != nil || n != 0 {
		t.Fatalf("renewed %d (%v) desired states that never expire", n, err)
	}
}
