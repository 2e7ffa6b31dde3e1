package broker

import (
	"fmt"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Publish publishes payload on topic from inside the broker, with QoS 1 to
// the subscribers whose subscription asks for it, retained if retained:
// when it returns, the message is retained (and queued for its persistence
// by the retained hook) and handed to every matching subscriber.
//
// The controller publishes desired states this way when the broker is its
// own. A rollout wave issues thousands at once; through its MQTT client
// each costs a loopback round trip, two packet encodings and goroutine
// hand-offs in the client and the broker, which measured at more than a
// second for 5,000 (BENCHMARKS.md). Everything else, and every publish to
// an external broker, still goes through the controller's client.
func (b *Broker) Publish(topic string, payload []byte, retained bool) error {
	if err := b.srv.Publish(topic, payload, retained, 1); err != nil {
		return fmt.Errorf("publish to %s in the embedded broker: %w", topic, err)
	}
	return nil
}

// PublishAsync is Publish in the shape of the controller's publishers:
// done gets the outcome before PublishAsync returns.
func (b *Broker) PublishAsync(topic string, payload []byte, retained bool, done func(error)) {
	err := b.Publish(topic, payload, retained)
	if done != nil {
		done(err)
	}
}

// SubscribeInline hands every message published on filter to deliver, in
// process, on the publishing client's goroutine: first the retained ones
// (retained set), then each new one. This is how the controller reads
// device messages from its own broker (link.Options.Inline).
//
// A subscription of a client session would hold what the controller has
// not read yet in the session's outbound queue, and mochi drops every
// message that finds it full (ClientWritesPending). Here nothing queues
// in the broker: a deliver that waits (the controller's queue is full)
// holds back the device that published, which waits on TCP, and no
// message is dropped.
func (b *Broker) SubscribeInline(filter string, deliver func(topic string, payload []byte, retained bool)) error {
	// Retained messages are delivered inside srv.Subscribe; new ones may
	// arrive concurrently only once devices are let in (Open).
	var replaying atomic.Bool
	replaying.Store(true)
	defer replaying.Store(false)
	id := int(b.inlineSubs.Add(1))
	err := b.srv.Subscribe(filter, id, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		deliver(pk.TopicName, pk.Payload, replaying.Load() && pk.FixedHeader.Retain)
	})
	if err != nil {
		return fmt.Errorf("subscribe to %s in the embedded broker: %w", filter, err)
	}
	return nil
}
