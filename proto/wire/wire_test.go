package wire

import (
	"errors"
	"strings"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

func TestSealOpenRoundTrip(t *testing.T) {
	now := time.UnixMilli(1_700_000_000_000)
	in := &pb.Hello{Labels: map[string]string{"region": "eu"}, AgentVersion: "1.2.3"}
	b, err := Seal("dev-1", now, in)
	if err != nil {
		t.Fatal(err)
	}
	env, err := Open(Topic("dev-1", KindHello), b)
	if err != nil {
		t.Fatal(err)
	}
	if env.GetSentAtUnixMs() != now.UnixMilli() || env.GetProtocolVersion() != ProtocolVersion {
		t.Fatalf("envelope header = %v", env)
	}
	if !proto.Equal(env.GetHello(), in) {
		t.Fatalf("hello = %v, want %v", env.GetHello(), in)
	}
}

func TestOpenRefuses(t *testing.T) {
	now := time.Now()
	hello, _ := Seal("dev-1", now, &pb.Hello{})
	old, _ := proto.Marshal(&pb.Envelope{DeviceId: "dev-1", Body: &pb.Envelope_Hello{Hello: &pb.Hello{}}})
	cases := []struct {
		name, topic string
		payload     []byte
		want        string
	}{
		{"garbage", Topic("dev-1", KindHello), []byte{0xff, 0xff, 0xff}, "not an Edgefleet envelope"},
		{"too large", Topic("dev-1", KindHello), make([]byte, MaxPayload+1), "too large"},
		{"other device", Topic("dev-2", KindHello), hello, `names device "dev-1"`},
		{"wrong kind", Topic("dev-1", KindState), hello, `want a "state" message`},
		{"bad topic", "ef/v1/dev/dev-1/nope", hello, "unknown kind"},
		{"foreign topic", "other/thing", hello, "not under"},
		{"version 0", Topic("dev-1", KindHello), old, "protocol version 0"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(c.topic, c.payload)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Open error = %v, want it to contain %q", err, c.want)
			}
		})
	}
}

func TestSealRefusesOversize(t *testing.T) {
	big := &pb.Command{Name: strings.Repeat("x", MaxPayload)}
	if _, err := Seal("d", time.Now(), big); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
}

func TestParseTopic(t *testing.T) {
	id, k, err := ParseTopic("ef/v1/dev/pos-7.a_b/telemetry")
	if err != nil || id != "pos-7.a_b" || k != KindTelemetry {
		t.Fatalf("got %q %q %v", id, k, err)
	}
	for _, bad := range []string{"ef/v1/dev//hello", "ef/v1/dev/a/b/hello", "ef/v1/dev/+/hello", "ef/v1/dev/.x/hello"} {
		if _, _, err := ParseTopic(bad); err == nil {
			t.Errorf("ParseTopic(%q) accepted", bad)
		}
	}
}

// FuzzOpen feeds every topic kind and every body: what Open accepts is
// within the cap and is the body its topic names.
func FuzzOpen(f *testing.F) {
	bodies := map[Kind]proto.Message{
		KindHello:     &pb.Hello{Labels: map[string]string{"a": "b"}, State: &pb.ReportedState{Slots: []*pb.SlotState{{Slot: "s"}}}},
		KindState:     &pb.ReportedState{SpoolDepth: 3, RecentErrors: []string{"x"}},
		KindPresence:  &pb.Presence{Online: true},
		KindEvents:    &pb.Event{Kind: pb.EventKind_EVENT_KIND_REFUSED, Detail: "d"},
		KindTelemetry: &pb.TelemetryBatch{SpoolEpoch: "e", Records: []*pb.TelemetryRecord{{Seq: 1}}},
		KindDesired:   &pb.SignedDesiredState{Desired: []byte{0x0a, 0x01, 'd'}, KeyId: "k"},
		KindAck:       &pb.TelemetryAck{SpoolEpoch: "e"},
		KindCmd:       &pb.Command{Name: "resync"},
		KindKeys:      &pb.KeyAnnouncements{Announcements: []*pb.SignedKeyAnnouncement{{Announcement: []byte{8, 2}, KeyId: "k"}}},
	}
	for kind, body := range bodies {
		b, err := Seal("d", time.UnixMilli(1), body)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(Topic("d", kind), b)
		f.Add(Topic("d", KindHello), b) // the wrong kind for most
	}
	f.Add("ef/v1/dev/d/state", []byte{})
	f.Fuzz(func(t *testing.T, topic string, payload []byte) {
		env, err := Open(topic, payload)
		if err != nil {
			return
		}
		if env == nil {
			t.Fatal("nil envelope without error")
		}
		if len(payload) > MaxPayload {
			t.Fatalf("%d-byte payload opened", len(payload))
		}
		if _, kind, _ := ParseTopic(topic); bodyKind(env) != kind {
			t.Fatalf("%s body on a %s topic", bodyKind(env), kind)
		}
	})
}
