package broker

import (
	"bytes"

	"github.com/edgefleet/edgefleet/proto/wire"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// reportsHook clears the retain flag of device state and presence
// messages, wills included (Options.UnretainedReports), so the broker
// does not keep them.
//
// Agents publish both retained, for an external broker, where the
// controller's client may subscribe after the devices published. The
// controller's own broker has no such reader: the controller subscribes
// in process before devices are let in (Open) and reads every message as
// it is published, and a restart loses the broker's memory anyway
// (retain.go keeps only desired states). Kept, they would cost two
// retained messages per device, which mochi copies in full (800 bytes a
// packet) every second to look for expired ones: at 10,000 devices that
// copy was a tenth of the controller's CPU, 57 MB live at a time and
// some 15 MB of garbage a second, made under the lock that every
// retained publish (each desired state of a wave) waits for
// (BENCHMARKS.md, issue 9).
type reportsHook struct {
	mqtt.HookBase
}

func (h *reportsHook) ID() string { return "edgefleet-unretained-reports" }

func (h *reportsHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnPublish, mqtt.OnWill}, []byte{b})
}

// unretained reports whether topic is a device's state or presence.
func unretained(topic string) bool {
	_, kind, err := wire.ParseTopic(topic)
	return err == nil && (kind == wire.KindState || kind == wire.KindPresence)
}

func (h *reportsHook) OnPublish(_ *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Retain && unretained(pk.TopicName) {
		pk.FixedHeader.Retain = false
	}
	return pk, nil
}

func (h *reportsHook) OnWill(_ *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	if will.Retain && unretained(will.TopicName) {
		will.Retain = false
	}
	return will, nil
}
