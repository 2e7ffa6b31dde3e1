package rollout_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/director"
	"github.com/edgefleet/edgefleet/controller/inventory"
	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// fleet is what the engine's end-to-end tests (latency_test.go,
// shadow_test.go) share: a real store holding model m at 1.0.0 and
// 2.0.0, a real director, devices that said hello (label fleet=t) and are
// online, their messages stored through the inventory as the
// controller's are, and the rollout engine. Only the devices are played by
// the tests.
type fleet struct {
	t      *testing.T
	st     *store.Store
	dir    *director.Director
	inv    *inventory.Inventory
	e      *rollout.Engine // nil until start
	ids    []string
	v1, v2 store.Model
}

// newFleet registers n devices, dev-00 to dev-(n-1), at now(), which is
// also the director's clock. The engine starts with start, once the test
// has laid out what the devices did before it.
func newFleet(t *testing.T, n int, now func() time.Time) *fleet {
	t.Helper()
	ctx := t.Context()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "c.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fleet{t: t, st: st}
	for i, v := range []string{"1.0.0", "2.0.0"} {
		m, _, err := st.PutModel(ctx, store.Model{Name: "m", Version: v, Digest: strings.Repeat(fmt.Sprint(i+1), 64), Size: 100, Manifest: []byte("{}")})
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			f.v1 = m
		} else {
			f.v2 = m
		}
	}
	f.dir = director.New(director.Options{Store: st, Publisher: &published{}, Now: now})
	f.inv = inventory.New(st, nil, nil)
	for i := range n {
		id := fmt.Sprintf("dev-%02d", i)
		f.ids = append(f.ids, id)
		if err := f.inv.Hello(ctx, id, now(), &pb.Hello{Labels: map[string]string{"fleet": "t"}, AgentVersion: "1"}); err != nil {
			t.Fatal(err)
		}
		if err := f.inv.Presence(ctx, id, now(), &pb.Presence{Online: true}); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// start runs the engine with opts (its store and issuer are the fleet's)
// until the test ends.
func (f *fleet) start(opts rollout.Options) {
	f.t.Helper()
	opts.Store, opts.Issuer = f.st, f.dir
	e, err := rollout.New(opts)
	if err != nil {
		f.t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(rctx) }()
	f.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			f.t.Errorf("engine: %v", err)
		}
	})
	<-e.Started()
	f.e = e
}

// changed tells a running engine that device id sent something.
func (f *fleet) changed(id string) {
	if f.e != nil {
		f.e.DeviceChanged(id)
	}
}

// create starts a rollout of spec (JSON) and returns its id.
func (f *fleet) create(spec string) string {
	f.t.Helper()
	s, err := rollout.ParseSpec([]byte(spec))
	if err != nil {
		f.t.Fatal(err)
	}
	id, err := f.e.Create(f.t.Context(), s)
	if err != nil {
		f.t.Fatal(err)
	}
	return id
}

// wait polls cond every 10 ms for up to 20 s; cond's string says where
// things stood, for the failure.
func (f *fleet) wait(what string, cond func() (bool, string)) {
	f.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.t.Fatalf("timed out waiting for %s; last: %s", what, last)
}

func (f *fleet) status(id string) rollout.Status {
	f.t.Helper()
	s, err := f.e.Status(f.t.Context(), id)
	if err != nil {
		f.t.Fatal(err)
	}
	return s
}

// published records what the director would send to the broker.
type published struct {
	mu sync.Mutex
	n  int
}

func (p *published) PublishAsync(topic string, payload []byte, retained bool, done func(error)) {
	p.mu.Lock()
	p.n++
	p.mu.Unlock()
	done(nil)
}

func ref(m store.Model) *pb.ModelRef {
	return &pb.ModelRef{Name: m.Name, Version: m.Version, BundleSha256: m.Digest}
}
