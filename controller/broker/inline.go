package broker

import (
	"fmt"
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
