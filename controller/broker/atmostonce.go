package broker

import "fmt"

// PublishAtMostOnce publishes payload on topic from inside the broker with
// QoS 0: subscribers get it once or, if offline or too far behind, not at
// all, and none acknowledges it. The controller sends telemetry acks this
// way when the broker is its own (telemetry.Publisher): an agent resends
// what stays unacknowledged, and an ack through the controller's MQTT
// client would cost a loopback round trip and two packet encodings.
func (b *Broker) PublishAtMostOnce(topic string, payload []byte) error {
	if err := b.srv.Publish(topic, payload, false, 0); err != nil {
		return fmt.Errorf("publish to %s in the embedded broker: %w", topic, err)
	}
	return nil
}
