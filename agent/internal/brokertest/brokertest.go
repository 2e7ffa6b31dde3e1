// Package brokertest runs a real MQTT broker (mochi) in the test process
// and gives tests a controller-side paho client, so agent tests exercise
// the real wire path instead of a fake.
package brokertest

import (
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"google.golang.org/protobuf/proto"
)

// Broker is an in-process MQTT broker on a loopback port.
type Broker struct {
	t    testing.TB
	Addr string // host:port
	srv  *mochi.Server
	once sync.Once
}

// Start runs a broker on a free loopback port until the test ends.
func Start(t testing.TB) *Broker {
	t.Helper()
	return StartAt(t, "127.0.0.1:0")
}

// StartAt runs a broker on addr, e.g. to bring one back on the port a
// stopped broker used.
func StartAt(t testing.TB, addr string) *Broker {
	t.Helper()
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	var l *listeners.TCP
	var err error
	// The port of a broker that just stopped can take a moment to free up.
	for i := 0; i < 50; i++ {
		l = listeners.NewTCP(listeners.Config{ID: "t", Address: addr})
		if err = srv.AddListener(l); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("broker listen on %s: %v", addr, err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	b := &Broker{t: t, Addr: l.Address(), srv: srv}
	t.Cleanup(b.Close)
	return b
}

// URL is the broker's tcp:// URL.
func (b *Broker) URL() string { return "tcp://" + b.Addr }

// Close stops the broker and drops every client connection.
func (b *Broker) Close() { b.once.Do(func() { b.srv.Close() }) }

// Message is one message the controller client received.
type Message struct {
	Topic    string
	Retained bool
	Env      *pb.Envelope
	Raw      []byte
	// Compressed is set for a telemetry batch that came as
	// telemetry_zstd; Env then holds it decompressed, as Env.Telemetry.
	Compressed bool
}

// Controller is a paho client playing the controller's side.
type Controller struct {
	t      testing.TB
	c      mqtt.Client
	mu     sync.Mutex
	msgs   []Message
	notify chan struct{}
}

// Controller connects a client that records every message under
// ef/v1/dev/+/... for the agent-to-controller kinds.
func (b *Broker) Controller(t testing.TB) *Controller {
	t.Helper()
	ctl := &Controller{t: t, notify: make(chan struct{}, 1)}
	opts := mqtt.NewClientOptions().AddBroker(b.URL()).SetClientID(fmt.Sprintf("controller-%d", time.Now().UnixNano())).
		SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(true)
	ctl.c = mqtt.NewClient(opts)
	if tok := ctl.c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("controller connect: %v", tok.Error())
	}
	filters := map[string]byte{}
	for _, k := range []wire.Kind{wire.KindHello, wire.KindState, wire.KindPresence, wire.KindEvents, wire.KindTelemetry} {
		filters[wire.AllDevices(k)] = 1
	}
	tok := ctl.c.SubscribeMultiple(filters, func(_ mqtt.Client, m mqtt.Message) {
		msg := Message{Topic: m.Topic(), Retained: m.Retained(), Raw: m.Payload()}
		if len(m.Payload()) > 0 {
			env, err := wire.Open(m.Topic(), m.Payload())
			if err != nil {
				t.Errorf("controller got a malformed message on %s: %v", m.Topic(), err)
				return
			}
			if z, ok := env.GetBody().(*pb.Envelope_TelemetryZstd); ok {
				b, err := wire.DecompressBatch(z.TelemetryZstd)
				if err != nil {
					t.Errorf("controller got a bad compressed batch on %s: %v", m.Topic(), err)
					return
				}
				env.Body, msg.Compressed = &pb.Envelope_Telemetry{Telemetry: b}, true
			}
			msg.Env = env
		}
		ctl.mu.Lock()
		ctl.msgs = append(ctl.msgs, msg)
		ctl.mu.Unlock()
		select {
		case ctl.notify <- struct{}{}:
		default:
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("controller subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { ctl.c.Disconnect(0) })
	return ctl
}

// Send seals body for device id and publishes it on the device's topic of
// kind (retained when the kind is).
func (c *Controller) Send(id string, kind wire.Kind, body proto.Message) {
	c.t.Helper()
	b, err := wire.Seal(id, time.Now(), body)
	if err != nil {
		c.t.Fatal(err)
	}
	c.SendRaw(wire.Topic(id, kind), b, kind.Retained())
}

// SendRaw publishes payload as is.
func (c *Controller) SendRaw(topic string, payload []byte, retained bool) {
	c.t.Helper()
	if tok := c.c.Publish(topic, 1, retained, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		c.t.Fatalf("controller publish %s: %v", topic, tok.Error())
	}
}

// Messages returns a copy of what was received so far.
func (c *Controller) Messages() []Message {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Message(nil), c.msgs...)
}

// WaitFor waits until a received message satisfies match and returns it,
// failing the test after timeout. Messages are checked from the first
// one received, so a match that already arrived is returned at once.
func (c *Controller) WaitFor(timeout time.Duration, what string, match func(Message) bool) Message {
	c.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		for _, m := range c.Messages() {
			if match(m) {
				return m
			}
		}
		select {
		case <-c.notify:
		case <-time.After(50 * time.Millisecond):
		case <-deadline.C:
			c.t.Fatalf("timed out after %s waiting for %s; got %d messages", timeout, what, len(c.Messages()))
		}
	}
}

// Count returns how many received messages satisfy match.
func (c *Controller) Count(match func(Message) bool) int {
	n := 0
	for _, m := range c.Messages() {
		if match(m) {
			n++
		}
	}
	return n
}

// Kind matches messages of one kind from one device.
func Kind(id string, k wire.Kind) func(Message) bool {
	topic := wire.Topic(id, k)
	return func(m Message) bool { return m.Topic == topic }
}

// FreeAddr returns a loopback address with a port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
