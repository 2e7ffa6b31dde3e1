package wire

import (
	"fmt"
	"strings"
)

// TopicRoot is the prefix of every Edgefleet topic. The "v1" is the topic
// tree's version; it changes only if the tree itself is reorganised.
const TopicRoot = "ef/v1/dev/"

// Kind names one topic under a device's tree.
type Kind string

// The topics of a device's tree. DESIGN.md lists direction, QoS and
// retention of each.
const (
	KindHello     Kind = "hello"     // agent -> controller
	KindState     Kind = "state"     // agent -> controller, retained
	KindPresence  Kind = "presence"  // agent (and its last will), retained
	KindEvents    Kind = "events"    // agent -> controller
	KindTelemetry Kind = "telemetry" // agent -> controller
	KindDesired   Kind = "desired"   // controller -> agent, retained
	KindAck       Kind = "ack"       // controller -> agent
	KindCmd       Kind = "cmd"       // controller -> agent
	// KindKeys carries every key announcement (pb.KeyAnnouncements),
	// controller -> agent, retained: a device reads it, never writes it.
	KindKeys Kind = "keys"
)

var kinds = map[Kind]bool{
	KindHello: true, KindState: true, KindPresence: true, KindEvents: true,
	KindTelemetry: true, KindDesired: true, KindAck: true, KindCmd: true,
	KindKeys: true,
}

// Retained reports whether messages of this kind are published retained.
func (k Kind) Retained() bool {
	return k == KindState || k == KindPresence || k == KindDesired || k == KindKeys
}

// Topic returns the topic of kind k for device id.
func Topic(id string, k Kind) string {
	return TopicRoot + id + "/" + string(k)
}

// AllDevices returns the wildcard subscription for kind k across all devices.
func AllDevices(k Kind) string {
	return TopicRoot + "+/" + string(k)
}

// ParseTopic splits a device topic into its device id and kind.
func ParseTopic(topic string) (id string, k Kind, err error) {
	rest, ok := strings.CutPrefix(topic, TopicRoot)
	if !ok {
		return "", "", fmt.Errorf("topic %q is not under %s", topic, TopicRoot)
	}
	id, kind, ok := strings.Cut(rest, "/")
	if !ok || strings.Contains(kind, "/") {
		return "", "", fmt.Errorf("topic %q: want %s{id}/{kind}", topic, TopicRoot)
	}
	if err := ValidateDeviceID(id); err != nil {
		return "", "", fmt.Errorf("topic %q: %w", topic, err)
	}
	if !kinds[Kind(kind)] {
		return "", "", fmt.Errorf("topic %q: unknown kind %q", topic, kind)
	}
	return id, Kind(kind), nil
}

// MaxDeviceID is the longest device id accepted.
const MaxDeviceID = 128

// ValidateDeviceID checks that id can stand as one MQTT topic level and in
// file names: 1 to 128 characters of letters, digits, '-', '_' and '.',
// not starting with '.'.
func ValidateDeviceID(id string) error {
	if id == "" {
		return fmt.Errorf("device id is empty")
	}
	if len(id) > MaxDeviceID {
		return fmt.Errorf("device id %.20q... is %d bytes long; the limit is %d", id, len(id), MaxDeviceID)
	}
	if id[0] == '.' {
		return fmt.Errorf("device id %q starts with '.'; use a letter or digit", id)
	}
	for _, c := range id {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return fmt.Errorf("device id %q contains %q; use letters, digits, '-', '_' or '.'", id, c)
		}
	}
	return nil
}
