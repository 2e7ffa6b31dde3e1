package broker

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/proto/wire"
	"github.com/mochi-mqtt/server/v2/packets"
)

// dieWithWill connects as id with a retained will on its presence topic,
// then drops the connection without DISCONNECT, so the broker publishes
// the will.
func dieWithWill(t *testing.T, b *Broker, id string, will []byte) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", b.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: id,
		WillFlag: true, WillTopic: wire.Topic(id, wire.KindPresence), WillPayload: will, WillQos: 1, WillRetain: true,
	}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	// CONNACK, then the broker has the will.
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	ack := make([]byte, 4)
	if _, err := conn.Read(ack); err != nil || ack[0]>>4 != packets.Connack {
		t.Fatalf("connack = %x, %v", ack, err)
	}
}

// TestUnretainedReports checks that with UnretainedReports the broker
// still delivers device state and presence (wills too) to a subscriber
// that is there, but keeps none of them retained, while desired states
// stay retained; and that without it all of them are retained.
func TestUnretainedReports(t *testing.T) {
	for _, tc := range []struct {
		name       string
		unretained bool
		want       []wire.Kind
	}{
		{"unretained", true, []wire.Kind{wire.KindDesired}},
		{"retained", false, []wire.Kind{wire.KindDesired, wire.KindState, wire.KindPresence}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := start(t, Options{UnretainedReports: tc.unretained})
			var mu sync.Mutex
			live := map[string]string{}
			for _, k := range []wire.Kind{wire.KindState, wire.KindPresence} {
				if err := b.SubscribeInline(wire.AllDevices(k), func(topic string, payload []byte, _ bool) {
					mu.Lock()
					live[topic] = string(payload)
					mu.Unlock()
				}); err != nil {
					t.Fatal(err)
				}
			}
			c := mustConnect(t, b, "d1")
			publish(t, c, wire.Topic("d1", wire.KindState), []byte("state"))
			publish(t, c, wire.Topic("d1", wire.KindPresence), []byte("online"))
			if err := b.Publish(wire.Topic("d1", wire.KindDesired), []byte("desired"), true); err != nil {
				t.Fatal(err)
			}
			dieWithWill(t, b, "d2", []byte("offline"))

			deadline := time.Now().Add(5 * time.Second)
			for {
				mu.Lock()
				n := len(live)
				mu.Unlock()
				if n == 3 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("delivered live = %q, want d1's state and presence and d2's will", live)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if live[wire.Topic("d2", wire.KindPresence)] != "offline" || live[wire.Topic("d1", wire.KindState)] != "state" {
				t.Fatalf("delivered live = %q", live)
			}

			got := retainedOn(t, mustConnect(t, b, "reader"), "ef/v1/dev/#")
			want := map[string]bool{}
			for _, k := range tc.want {
				want[wire.Topic("d1", k)] = true
			}
			if !tc.unretained {
				want[wire.Topic("d2", wire.KindPresence)] = true
			}
			if len(got) != len(want) {
				t.Fatalf("retained = %q, want %v", got, want)
			}
			for topic := range got {
				if !want[topic] {
					t.Fatalf("retained = %q, want %v", got, want)
				}
			}
		})
	}
}

// TestPacketsLongerThanTheReadBuffer checks that packets of every length
// around and past ClientReadBuffer arrive whole, back to back.
func TestPacketsLongerThanTheReadBuffer(t *testing.T) {
	b, _ := start(t, Options{})
	got := make(chan []byte, 16)
	if err := b.SubscribeInline(wire.AllDevices(wire.KindTelemetry), func(_ string, payload []byte, _ bool) {
		got <- bytes.Clone(payload)
	}); err != nil {
		t.Fatal(err)
	}
	c := mustConnect(t, b, "d1")
	sizes := []int{1, ClientReadBuffer - 10, ClientReadBuffer, ClientReadBuffer + 1, 3*ClientReadBuffer + 7, 64 << 10}
	for i, n := range sizes {
		payload := bytes.Repeat([]byte{byte(i + 1)}, n)
		if tok := c.Publish(wire.Topic("d1", wire.KindTelemetry), 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d bytes: %v", n, tok.Error())
		}
	}
	for i, n := range sizes {
		select {
		case p := <-got:
			if !bytes.Equal(p, bytes.Repeat([]byte{byte(i + 1)}, n)) {
				t.Fatalf("message %d: %d bytes, want %d bytes of %d", i, len(p), n, i+1)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d of %d bytes did not arrive", i, n)
		}
	}
}
