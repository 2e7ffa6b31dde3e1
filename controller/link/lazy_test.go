package link

import (
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

func TestOpenTelemetry(t *testing.T) {
	topic := wire.Topic("d", wire.KindTelemetry)
	batch := &pb.TelemetryBatch{SpoolEpoch: "e", Records: []*pb.TelemetryRecord{{Seq: 1}}}
	plain, _ := wire.Seal("d", time.Now(), batch)
	env, raw, err := openTelemetry(topic, plain)
	var got pb.TelemetryBatch
	if err != nil || env.GetDeviceId() != "d" || env.GetBody() != nil || proto.Unmarshal(raw, &got) != nil || !proto.Equal(&got, batch) {
		t.Fatalf("plain: %v, %v, %v", env, raw, err)
	}
	z, _ := wire.Seal("d", time.Now(), &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: []byte("zz")}})
	if env, raw, err := openTelemetry(topic, z); err != nil || raw != nil || string(env.GetTelemetryZstd()) != "zz" {
		t.Fatalf("compressed: %v, %v, %v", env, raw, err)
	}
	other, _ := wire.Seal("other", time.Now(), batch)
	hello, _ := wire.Seal("d", time.Now(), &pb.Hello{})
	for name, c := range map[string]struct {
		payload []byte
		want    string
	}{
		"other device":  {other, `names device "other"`},
		"not telemetry": {hello, `body is "other"`},
		"oversized":     {make([]byte, wire.MaxPayload+1), "too large"},
		"garbage":       {[]byte{0xff}, "decode envelope"},
		"no version":    {[]byte{0x1a, 0x01, 'd'}, "protocol version 0"},
	} {
		if _, _, err := openTelemetry(topic, c.payload); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", name, err, c.want)
		}
	}
	if _, _, err := openTelemetry(topic, make([]byte, wire.MaxPayload+1)); !errors.Is(err, wire.ErrTooLarge) {
		t.Errorf("oversized: %v", err)
	}
}

// FuzzOpenTelemetry holds openTelemetry to wire.Open: a telemetry message
// wire.Open accepts, openTelemetry accepts with the same header and the
// same batch; one openTelemetry refuses, wire.Open refuses.
func FuzzOpenTelemetry(f *testing.F) {
	topic := wire.Topic("d", wire.KindTelemetry)
	plain, _ := wire.Seal("d", time.Now(), &pb.TelemetryBatch{SpoolEpoch: "e", Records: []*pb.TelemetryRecord{{Seq: 1}}})
	z, _ := wire.Seal("d", time.Now(), &pb.Envelope{Body: &pb.Envelope_TelemetryZstd{TelemetryZstd: []byte{1, 2}}})
	f.Add(plain)
	f.Add(z)
	f.Add(append(plain, plain...)) // fields repeated: merged by proto
	f.Fuzz(func(t *testing.T, payload []byte) {
		env, raw, err := openTelemetry(topic, payload)
		want, werr := wire.Open(topic, payload)
		if err != nil {
			if werr == nil {
				t.Fatalf("openTelemetry refuses what wire.Open reads: %v", err)
			}
			return
		}
		if werr != nil {
			return // a batch that does not decode: the ingest's decoder refuses it
		}
		if env.GetProtocolVersion() != want.GetProtocolVersion() || env.GetDeviceId() != want.GetDeviceId() ||
			env.GetMessageId() != want.GetMessageId() || env.GetSentAtUnixMs() != want.GetSentAtUnixMs() {
			t.Fatalf("header %v, want %v", env, want)
		}
		if z := want.GetTelemetryZstd(); z != nil {
			if string(env.GetTelemetryZstd()) != string(z) || raw != nil {
				t.Fatalf("compressed body %x, want %x", env.GetTelemetryZstd(), z)
			}
			return
		}
		var got pb.TelemetryBatch
		if err := proto.Unmarshal(raw, &got); err != nil || !proto.Equal(&got, want.GetTelemetry()) {
			t.Fatalf("batch %v (%v), want %v", &got, err, want.GetTelemetry())
		}
	})
}
