package broker

import (
	"bytes"
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/wire"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// start runs a broker on a free port until the test ends (or stop is called).
func start(t *testing.T, opts Options) (b *Broker, stop func()) {
	t.Helper()
	opts.Listen = "127.0.0.1:0"
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	if err := b.Open(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return b, stop
}

func connect(t *testing.T, b *Broker, id string) (paho.Client, error) {
	t.Helper()
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + b.Addr().String()).SetClientID(id).SetConnectTimeout(5 * time.Second).SetProtocolVersion(4))
	tok := c.Connect()
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatal("connect timed out")
	}
	if tok.Error() == nil {
		t.Cleanup(func() { c.Disconnect(100) })
	}
	return c, tok.Error()
}

func mustConnect(t *testing.T, b *Broker, id string) paho.Client {
	t.Helper()
	c, err := connect(t, b, id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func publish(t *testing.T, c paho.Client, topic string, payload []byte) {
	t.Helper()
	tok := c.Publish(topic, 1, true, payload)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// retainedOn subscribes to filter and collects what arrives within a short
// wait: retained messages are sent right after the subscription.
func retainedOn(t *testing.T, c paho.Client, filter string) map[string][]byte {
	t.Helper()
	var mu sync.Mutex
	got := map[string][]byte{}
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		mu.Lock()
		defer mu.Unlock()
		got[m.Topic()] = bytes.Clone(m.Payload())
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	return got
}

func TestRetainedDesiredSurvivesRestart(t *testing.T) {
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	b, stop := start(t, Options{Retained: st})
	c := mustConnect(t, b, "writer")
	publish(t, c, wire.Topic("d1", wire.KindDesired), []byte("desired-1"))
	publish(t, c, wire.Topic("d2", wire.KindDesired), []byte("desired-2"))
	publish(t, c, wire.Topic("d1", wire.KindState), []byte("state-1"))
	publish(t, c, wire.Topic("d1", wire.KindPresence), []byte("online"))
	// An empty retained payload clears d2's desired state.
	publish(t, c, wire.Topic("d2", wire.KindDesired), nil)
	c.Disconnect(100)
	stop()

	b2, _ := start(t, Options{Retained: st})
	got := retainedOn(t, mustConnect(t, b2, "reader"), "ef/v1/dev/#")
	if len(got) != 1 || string(got[wire.Topic("d1", wire.KindDesired)]) != "desired-1" {
		t.Fatalf("retained after restart = %q, want only d1's desired state", got)
	}
}

func TestWithoutStoreRetainedIsMemoryOnly(t *testing.T) {
	b, stop := start(t, Options{})
	publish(t, mustConnect(t, b, "w"), wire.Topic("d1", wire.KindDesired), []byte("x"))
	if got := retainedOn(t, mustConnect(t, b, "r"), "ef/v1/dev/#"); len(got) != 1 {
		t.Fatalf("retained before restart = %q", got)
	}
	stop()
	b2, _ := start(t, Options{})
	if got := retainedOn(t, mustConnect(t, b2, "r2"), "ef/v1/dev/#"); len(got) != 0 {
		t.Fatalf("retained after restart without a store = %q", got)
	}
}

// denyHook stands in for the future certificate/ACL hook.
type denyHook struct{ mqtt.HookBase }

func (denyHook) ID() string { return "deny-evil" }
func (denyHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (denyHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	return cl.ID != "evil"
}
func (denyHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

func TestAuthHook(t *testing.T) {
	b, _ := start(t, Options{Auth: &denyHook{}})
	if _, err := connect(t, b, "evil"); err == nil {
		t.Fatal("the auth hook did not refuse client evil")
	}
	mustConnect(t, b, "good")
}

// TestPublicListenerWaitsForOpen checks that devices are served only after
// Open, while the internal listener is served from the start.
func TestPublicListenerWaitsForOpen(t *testing.T) {
	b, err := New(Options{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	dial := func(addr, id string) error {
		c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetConnectTimeout(300 * time.Millisecond).SetProtocolVersion(4))
		tok := c.Connect()
		tok.WaitTimeout(2 * time.Second)
		if tok.Error() == nil {
			c.Disconnect(10)
		}
		return tok.Error()
	}
	if err := dial(b.InternalAddr().String(), "controller"); err != nil {
		t.Fatalf("internal listener before Open: %v", err)
	}
	if err := dial(b.Addr().String(), "early-device"); err == nil {
		t.Fatal("public listener served before Open")
	}
	if err := b.Open(); err != nil {
		t.Fatal(err)
	}
	if err := dial(b.Addr().String(), "device"); err != nil {
		t.Fatalf("public listener after Open: %v", err)
	}
}

func TestListenConflict(t *testing.T) {
	b, _ := start(t, Options{})
	_, err := New(Options{Listen: b.Addr().String()})
	if err == nil {
		t.Fatal("second broker on the same address started")
	}
}
