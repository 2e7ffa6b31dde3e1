package wire

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// ErrTooLarge is returned for a payload over MaxPayload.
var ErrTooLarge = errors.New("payload too large")

// NewMessageID returns a random 128-bit message id in hex.
func NewMessageID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Seal wraps body in an envelope for device id and marshals it. body must be
// one of the Envelope body types (*pb.Hello, *pb.ReportedState, ...), or an
// *pb.Envelope whose body is set (its header fields are ignored).
func Seal(id string, now time.Time, body proto.Message) ([]byte, error) {
	env := &pb.Envelope{
		ProtocolVersion: ProtocolVersion,
		MessageId:       NewMessageID(),
		DeviceId:        id,
		SentAtUnixMs:    now.UnixMilli(),
	}
	switch b := body.(type) {
	case *pb.Hello:
		env.Body = &pb.Envelope_Hello{Hello: b}
	case *pb.ReportedState:
		env.Body = &pb.Envelope_State{State: b}
	case *pb.Presence:
		env.Body = &pb.Envelope_Presence{Presence: b}
	case *pb.Event:
		env.Body = &pb.Envelope_Event{Event: b}
	case *pb.TelemetryBatch:
		env.Body = &pb.Envelope_Telemetry{Telemetry: b}
	case *pb.SignedDesiredState:
		env.Body = &pb.Envelope_Desired{Desired: b}
	case *pb.TelemetryAck:
		env.Body = &pb.Envelope_Ack{Ack: b}
	case *pb.Command:
		env.Body = &pb.Envelope_Command{Command: b}
	case *pb.KeyAnnouncements:
		env.Body = &pb.Envelope_Keys{Keys: b}
	case *pb.Envelope:
		// A body prepared by the caller, such as a compressed telemetry
		// batch (zstd.go), which has no message type of its own.
		if b.GetBody() == nil {
			return nil, fmt.Errorf("seal: envelope without a body")
		}
		env.Body = b.GetBody()
	default:
		return nil, fmt.Errorf("seal: %T is not an envelope body", body)
	}
	out, err := proto.Marshal(env)
	if err != nil {
		return nil, fmt.Errorf("seal %T: %w", body, err)
	}
	if len(out) > MaxPayload {
		return nil, fmt.Errorf("seal %T: %d bytes: %w (limit %d)", body, len(out), ErrTooLarge, MaxPayload)
	}
	return out, nil
}

// Open checks and decodes a payload received on topic. It refuses a payload
// over MaxPayload before decoding it, an unsupported protocol version, a
// device id that differs from the topic's, and a body that is not the kind
// the topic names. The returned error names the topic and what was wrong.
func Open(topic string, payload []byte) (*pb.Envelope, error) {
	id, kind, err := ParseTopic(topic)
	if err != nil {
		return nil, err
	}
	if len(payload) > MaxPayload {
		return nil, fmt.Errorf("%s: %d bytes: %w (limit %d)", topic, len(payload), ErrTooLarge, MaxPayload)
	}
	env := &pb.Envelope{}
	if err := proto.Unmarshal(payload, env); err != nil {
		return nil, fmt.Errorf("%s: payload is not an Edgefleet envelope: %w", topic, err)
	}
	if v := env.GetProtocolVersion(); v < MinProtocolVersion {
		return nil, fmt.Errorf("%s: protocol version %d; this side speaks %d to %d", topic, v, MinProtocolVersion, ProtocolVersion)
	}
	if env.GetDeviceId() != id {
		return nil, fmt.Errorf("%s: envelope names device %q, topic names %q", topic, env.GetDeviceId(), id)
	}
	if want := bodyKind(env); want != kind {
		return nil, fmt.Errorf("%s: body is %q, want a %q message", topic, want, kind)
	}
	return env, nil
}

func bodyKind(env *pb.Envelope) Kind {
	switch env.GetBody().(type) {
	case *pb.Envelope_Hello:
		return KindHello
	case *pb.Envelope_State:
		return KindState
	case *pb.Envelope_Presence:
		return KindPresence
	case *pb.Envelope_Event:
		return KindEvents
	case *pb.Envelope_Telemetry, *pb.Envelope_TelemetryZstd:
		return KindTelemetry
	case *pb.Envelope_Desired:
		return KindDesired
	case *pb.Envelope_Ack:
		return KindAck
	case *pb.Envelope_Command:
		return KindCmd
	case *pb.Envelope_Keys:
		return KindKeys
	}
	return "empty"
}
