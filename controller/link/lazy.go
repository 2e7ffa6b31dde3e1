package link

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// Envelope field numbers read by openTelemetry (proto/edgefleetv1).
const (
	fieldProtocolVersion protowire.Number = 1
	fieldMessageID       protowire.Number = 2
	fieldDeviceID        protowire.Number = 3
	fieldSentAt          protowire.Number = 4
	fieldTelemetry       protowire.Number = 14
	fieldTelemetryZstd   protowire.Number = 18
)

// openTelemetry checks a telemetry message as wire.Open does (size cap,
// protocol version, device id against the topic, a telemetry body) but
// leaves the batch unread: the returned envelope has the header and, for a
// compressed batch, its bytes; a plain batch comes back serialized, for
// the telemetry package's decoder, which reads hundreds of records without
// the allocations of a full unmarshal.
func openTelemetry(topic string, payload []byte) (*pb.Envelope, []byte, error) {
	id, kind, err := wire.ParseTopic(topic)
	if err != nil {
		return nil, nil, err
	}
	if kind != wire.KindTelemetry {
		return nil, nil, fmt.Errorf("%s: not a telemetry topic", topic)
	}
	if len(payload) > wire.MaxPayload {
		return nil, nil, fmt.Errorf("%s: %d bytes: %w (limit %d)", topic, len(payload), wire.ErrTooLarge, wire.MaxPayload)
	}
	env := &pb.Envelope{}
	var batch []byte
	body := ""
	for b := payload; len(b) > 0; {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, fmt.Errorf("%s: decode envelope: %v", topic, protowire.ParseError(n))
		}
		b = b[n:]
		var v []byte
		var x uint64
		switch typ {
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return nil, nil, fmt.Errorf("%s: decode envelope: %v", topic, protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == fieldProtocolVersion && typ == protowire.VarintType:
			env.ProtocolVersion = uint32(x)
		case num == fieldMessageID && typ == protowire.BytesType:
			env.MessageId = string(v)
		case num == fieldDeviceID && typ == protowire.BytesType:
			env.DeviceId = string(v)
		case num == fieldSentAt && typ == protowire.VarintType:
			env.SentAtUnixMs = int64(x)
		case num == fieldTelemetry && typ == protowire.BytesType:
			// A message field given twice merges; the batch's fields are
			// a string and a repeated message, so concatenating is merging.
			if body == "telemetry" {
				batch = append(append([]byte(nil), batch...), v...)
			} else {
				batch = v
			}
			env.Body, body = nil, "telemetry"
		case num == fieldTelemetryZstd && typ == protowire.BytesType:
			env.Body, batch, body = &pb.Envelope_TelemetryZstd{TelemetryZstd: v}, nil, "telemetry_zstd"
		case num >= 10 && num <= 30 && typ == protowire.BytesType:
			body = "other"
			env.Body, batch = nil, nil
		}
	}
	// Newer versions are read as wire.Open reads them: fields this side
	// does not know are skipped.
	if v := env.GetProtocolVersion(); v < wire.MinProtocolVersion {
		return nil, nil, fmt.Errorf("%s: protocol version %d; this side speaks %d to %d", topic, v, wire.MinProtocolVersion, wire.ProtocolVersion)
	}
	if env.GetDeviceId() != id {
		return nil, nil, fmt.Errorf("%s: envelope names device %q, topic names %q", topic, env.GetDeviceId(), id)
	}
	switch body {
	case "telemetry":
		if batch == nil {
			batch = []byte{} // an empty batch, present
		}
	case "telemetry_zstd":
	default:
		if body == "" {
			body = "empty"
		}
		return nil, nil, fmt.Errorf("%s: body is %q, want a %q message", topic, body, wire.KindTelemetry)
	}
	return env, batch, nil
}
