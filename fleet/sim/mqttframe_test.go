package sim

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// packet encodes one MQTT packet: fixed header, remaining length, body.
func packet(typ, flags byte, body []byte) []byte {
	out := []byte{typ<<4 | flags}
	n := len(body)
	for {
		b := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			break
		}
	}
	return append(out, body...)
}

func publishBody(topic string, id uint16, payload []byte) []byte {
	b := []byte{byte(len(topic) >> 8), byte(len(topic))}
	b = append(b, topic...)
	b = append(b, byte(id>>8), byte(id))
	return append(b, payload...)
}

type seen struct {
	typ    byte
	topic  string
	id     uint16
	length int
}

func TestFramer(t *testing.T) {
	big := bytes.Repeat([]byte{0xab}, 200_000) // a three-byte remaining length
	var stream []byte
	want := []seen{
		{typ: 1}, // CONNECT-like, arbitrary body
		{typ: pktPublish, topic: "ef/v1/dev/sim-00001/state", id: 7},
		{typ: pktPuback, id: 7},
		{typ: 12}, // PINGREQ: no body
		{typ: pktPublish, topic: "ef/v1/dev/sim-00001/telemetry", id: 65535},
		{typ: pktPublish, topic: "ef/v1/dev/sim-00001/presence"}, // QoS 0: no id
	}
	stream = append(stream, packet(1, 0, []byte("\x00\x04MQTT\x04\x02\x00\x1e"))...)
	stream = append(stream, packet(pktPublish, 2, publishBody("ef/v1/dev/sim-00001/state", 7, []byte("state")))...)
	stream = append(stream, packet(pktPuback, 0, []byte{0, 7})...)
	stream = append(stream, packet(12, 0, nil)...)
	stream = append(stream, packet(pktPublish, 2, publishBody("ef/v1/dev/sim-00001/telemetry", 65535, big))...)
	qos0 := []byte{0, byte(len("ef/v1/dev/sim-00001/presence"))}
	qos0 = append(append(qos0, "ef/v1/dev/sim-00001/presence"...), 1, 2, 3)
	stream = append(stream, packet(pktPublish, 0, qos0)...)

	for _, chunk := range []int{1, 2, 3, 7, 100, 4096, len(stream)} {
		var got []seen
		f := framer{onPacket: func(typ, flags byte, body []byte) {
			s := seen{typ: typ, length: len(body)}
			switch typ {
			case pktPublish:
				topic, id, ok := publishInfo(flags, body)
				if !ok {
					t.Fatalf("chunk %d: publish body %q: no topic", chunk, body)
				}
				s.topic, s.id = string(topic), id
			case pktPuback:
				s.id, _ = packetID(body)
			}
			got = append(got, s)
		}}
		for p := stream; len(p) > 0; {
			n := min(chunk, len(p))
			f.feed(p[:n])
			p = p[n:]
		}
		if len(got) != len(want) {
			t.Fatalf("chunk %d: %d packets, want %d: %+v", chunk, len(got), len(want), got)
		}
		for i := range want {
			if got[i].typ != want[i].typ || got[i].topic != want[i].topic || got[i].id != want[i].id {
				t.Errorf("chunk %d: packet %d = %+v, want %+v", chunk, i, got[i], want[i])
			}
		}
		if got[4].length != framerCapture {
			t.Errorf("chunk %d: big publish body kept %d bytes, want the first %d", chunk, got[4].length, framerCapture)
		}
	}
}

func TestIsKind(t *testing.T) {
	for _, tt := range []struct {
		topic, kind string
		want        bool
	}{
		{"ef/v1/dev/a/state", "state", true},
		{"ef/v1/dev/a/state", "tate", false},
		{"ef/v1/dev/a/xstate", "state", false},
		{"state", "state", false},
		{"ef/v1/dev/a/hello", "state", false},
	} {
		if got := isKind([]byte(tt.topic), tt.kind); got != tt.want {
			t.Errorf("isKind(%q, %q) = %v", tt.topic, tt.kind, got)
		}
	}
}

// A length of more than four bytes is not MQTT: the framer stops rather
// than report nonsense.
func TestFramerGivesUpOnGarbage(t *testing.T) {
	n := 0
	f := framer{onPacket: func(byte, byte, []byte) { n++ }}
	f.feed([]byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0x30, 0x00})
	if !f.broken || n != 0 {
		t.Fatalf("broken=%v packets=%d; want a broken framer that reported nothing", f.broken, n)
	}
}

func FuzzFramer(f *testing.F) {
	f.Add(packet(pktPublish, 2, publishBody("ef/v1/dev/x/state", 1, []byte("hi"))), uint8(3))
	f.Add(packet(pktPuback, 0, []byte{0, 1}), uint8(1))
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0x7f}, uint8(2))
	f.Fuzz(func(t *testing.T, stream []byte, chunk uint8) {
		if len(stream) > 1<<20 {
			return
		}
		total := 0
		fr := framer{onPacket: func(typ, flags byte, body []byte) {
			if len(body) > framerCapture {
				t.Fatalf("body prefix of %d bytes, cap is %d", len(body), framerCapture)
			}
			total++
			publishInfo(flags, body)
			packetID(body)
		}}
		c := int(chunk%16) + 1
		for p := stream; len(p) > 0; {
			n := min(c, len(p))
			fr.feed(p[:n])
			p = p[n:]
		}
		if total > len(stream) {
			t.Fatalf("%d packets out of %d bytes", total, len(stream))
		}
		// Chunking must not change what is seen.
		again := 0
		fr2 := framer{onPacket: func(byte, byte, []byte) { again++ }}
		fr2.feed(stream)
		if again != total {
			t.Fatalf("whole stream gave %d packets, chunks of %d gave %d", again, c, total)
		}
	})
}

func BenchmarkFramer(b *testing.B) {
	var stream []byte
	for i := range 100 {
		stream = append(stream, packet(pktPublish, 2, publishBody("ef/v1/dev/sim-00001/telemetry", uint16(i), make([]byte, 600)))...)
		stream = append(stream, packet(pktPuback, 0, []byte{0, byte(i)})...)
	}
	f := framer{onPacket: func(typ, flags byte, body []byte) {
		if typ == pktPublish {
			topic, _, _ := publishInfo(flags, body)
			isKind(topic, "state")
		}
	}}
	r := rand.New(rand.NewPCG(1, 2))
	b.SetBytes(int64(len(stream)))
	b.ReportAllocs()
	for b.Loop() {
		for p := stream; len(p) > 0; {
			n := min(1+r.IntN(8192), len(p))
			f.feed(p[:n])
			p = p[n:]
		}
	}
}
