package pahostore

import (
	"bytes"
	"io"
	"sync"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
)

func publish(id uint16) *packets.PublishPacket {
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.Qos, p.MessageID, p.TopicName, p.Payload = 1, id, "ef/v1/dev/d1/events", []byte("payload")
	return p
}

func TestPublishPacketsAreCopied(t *testing.T) {
	s := New()
	s.Open()
	p := publish(7)
	s.Put("o.7", p)
	// The writer encodes the packet it was given; the store must not see it.
	p.Dup, p.RemainingLength = true, 99

	got, ok := s.Get("o.7").(*packets.PublishPacket)
	if !ok {
		t.Fatalf("Get returned %T", s.Get("o.7"))
	}
	if got == p {
		t.Fatal("Get returned the packet given to Put")
	}
	if got.Dup || got.RemainingLength != 0 || got.MessageID != 7 || got.TopicName != p.TopicName || !bytes.Equal(got.Payload, p.Payload) {
		t.Fatalf("stored packet = %+v", got)
	}
	// resume sets Dup on what Get returns; the next Get is untouched.
	got.Dup = true
	if again := s.Get("o.7").(*packets.PublishPacket); again == got || again.Dup {
		t.Fatalf("a second Get shares or sees the first one's change: %+v", again)
	}

	sub := packets.NewControlPacket(packets.Subscribe).(*packets.SubscribePacket)
	s.Put("o.8", sub)
	if s.Get("o.8") != sub {
		t.Fatal("a subscribe packet should be kept as it is")
	}
	if s.Get("o.9") != nil {
		t.Fatal("a missing key should give nil")
	}
	if keys := s.All(); len(keys) != 2 {
		t.Fatalf("All = %v", keys)
	}
	s.Del("o.7")
	if s.Get("o.7") != nil {
		t.Fatal("Del left the packet")
	}
	s.Reset()
	if keys := s.All(); len(keys) != 0 {
		t.Fatalf("All after Reset = %v", keys)
	}
}

// TestWriterAndResumeShareNothing does what paho does on a reconnect while
// a publish is still queued: one goroutine writes the packet it published
// while another takes it from the store and marks it a duplicate. With
// paho's memory store `go test -race` reports it; here it must not.
func TestWriterAndResumeShareNothing(t *testing.T) {
	s := New()
	s.Open()
	p := publish(1)
	s.Put("o.1", p)
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := p.Write(io.Discard); err != nil {
			t.Error(err)
		}
	})
	wg.Go(func() {
		r := s.Get("o.1").(*packets.PublishPacket)
		r.Dup = true
		if err := r.Write(io.Discard); err != nil {
			t.Error(err)
		}
	})
	wg.Wait()
}
