// Package testdevice is a fake device for the controller's tests: a real
// paho client that publishes sealed Edgefleet messages on its own topics
// and collects what the controller sends it. It speaks only the wire
// protocol, like a real agent; it is not the agent.
package testdevice

import (
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// Timeout bounds every wait of a test device.
const Timeout = 10 * time.Second

// Device is one fake device connected to a broker.
type Device struct {
	ID string
	t  testing.TB
	c  paho.Client

	mu    sync.Mutex
	inbox map[wire.Kind]chan *pb.Envelope
}

// Connect connects device id to the broker at url (tcp://host:port). The
// client disconnects when the test ends.
func Connect(t testing.TB, url, id string) *Device {
	t.Helper()
	d := &Device{ID: id, t: t, inbox: map[wire.Kind]chan *pb.Envelope{}}
	d.c = paho.NewClient(paho.NewClientOptions().
		AddBroker(url).
		SetClientID("test-device-" + id).
		SetConnectTimeout(Timeout).
		SetProtocolVersion(4).
		SetAutoReconnect(false))
	tok := d.c.Connect()
	if !tok.WaitTimeout(Timeout) || tok.Error() != nil {
		t.Fatalf("device %s: connect to %s: %v", id, url, tok.Error())
	}
	t.Cleanup(func() { d.c.Disconnect(50) })
	return d
}

// Send seals body and publishes it on the device's topic of kind k,
// retained if that kind is, and waits for the broker's ack.
func (d *Device) Send(k wire.Kind, body proto.Message) {
	d.t.Helper()
	payload, err := wire.Seal(d.ID, time.Now(), body)
	if err != nil {
		d.t.Fatalf("device %s: seal %T: %v", d.ID, body, err)
	}
	d.SendRaw(wire.Topic(d.ID, k), payload, k.Retained())
}

// SendRaw publishes payload as is on topic.
func (d *Device) SendRaw(topic string, payload []byte, retained bool) {
	d.t.Helper()
	tok := d.c.Publish(topic, 1, retained, payload)
	if !tok.WaitTimeout(Timeout) || tok.Error() != nil {
		d.t.Fatalf("device %s: publish %s: %v", d.ID, topic, tok.Error())
	}
}

// Subscribe subscribes to the device's topic of kind k and returns the
// channel of envelopes received on it (opened with wire.Open; a payload
// that does not open fails the test, an empty one is skipped).
func (d *Device) Subscribe(k wire.Kind) <-chan *pb.Envelope {
	d.t.Helper()
	ch := make(chan *pb.Envelope, 100)
	d.mu.Lock()
	d.inbox[k] = ch
	d.mu.Unlock()
	tok := d.c.Subscribe(wire.Topic(d.ID, k), 1, func(_ paho.Client, m paho.Message) {
		if len(m.Payload()) == 0 {
			return
		}
		env, err := wire.Open(m.Topic(), m.Payload())
		if err != nil {
			d.t.Errorf("device %s: controller sent a bad message on %s: %v", d.ID, m.Topic(), err)
			return
		}
		select {
		case ch <- env:
		default:
			d.t.Errorf("device %s: inbox of %s is full", d.ID, k)
		}
	})
	if !tok.WaitTimeout(Timeout) || tok.Error() != nil {
		d.t.Fatalf("device %s: subscribe %s: %v", d.ID, k, tok.Error())
	}
	return ch
}

// Next waits for the next envelope on ch.
func (d *Device) Next(ch <-chan *pb.Envelope) *pb.Envelope {
	d.t.Helper()
	select {
	case env := <-ch:
		return env
	case <-time.After(Timeout):
		d.t.Fatalf("device %s: nothing received within %s", d.ID, Timeout)
		return nil
	}
}

// Eventually polls cond until it returns true, failing the test after
// Timeout with the last reason cond gave.
func Eventually(t testing.TB, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(Timeout)
	for {
		ok, why := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %s", Timeout, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
