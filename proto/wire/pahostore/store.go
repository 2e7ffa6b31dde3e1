// Package pahostore is the session store the agent's and the controller's
// MQTT clients use: paho's memory store, except that a publish packet goes
// in and comes out as a copy of its own.
//
// paho.mqtt.golang hands one *packets.PublishPacket to two owners. Publish
// stores the packet, then queues the same pointer for the connection's
// writer, which sets its RemainingLength while writing it. On a reconnect,
// resume takes every stored publish back out and sets its Dup flag before
// sending it again. A Publish that was waiting to be queued when the
// connection dropped is then written by the new connection's writer while
// resume flips Dup on the very same packet: a data race inside paho
// (eclipse-paho/paho.mqtt.golang #657 and #703), which `go test -race`
// caught in the end-to-end SIGKILL test. With a copy on the way in, the
// writer and the store never share a packet; with a copy on the way out,
// resume's Dup and the next writer's RemainingLength land on a packet no
// earlier writer saw. The payload bytes stay shared: nothing writes them.
//
// A packet may still go out twice (once from the late Publish, once from
// resume); at QoS 1 the receiver handles duplicates anyway.
package pahostore

import (
	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// Store is an in-memory mqtt.Store that copies publish packets on Put and
// on Get. Other packets (subscribe, pubrel, acks) are built fresh by paho
// for each use and are stored as they are.
type Store struct {
	mem *mqtt.MemoryStore
}

var _ mqtt.Store = (*Store)(nil)

// New returns an empty store; paho opens it on Connect.
func New() *Store { return &Store{mem: mqtt.NewMemoryStore()} }

// Open enables the store.
func (s *Store) Open() { s.mem.Open() }

// Close disables the store; its contents stay for the next Open.
func (s *Store) Close() { s.mem.Close() }

// Reset empties the store.
func (s *Store) Reset() { s.mem.Reset() }

// All lists the keys of the stored packets.
func (s *Store) All() []string { return s.mem.All() }

// Del removes a packet.
func (s *Store) Del(key string) { s.mem.Del(key) }

// Put stores a copy of a publish packet, or any other packet as it is.
func (s *Store) Put(key string, m packets.ControlPacket) { s.mem.Put(key, clone(m)) }

// Get returns a copy of a stored publish packet, the stored packet for any
// other kind, or nil.
func (s *Store) Get(key string) packets.ControlPacket { return clone(s.mem.Get(key)) }

func clone(m packets.ControlPacket) packets.ControlPacket {
	p, ok := m.(*packets.PublishPacket)
	if !ok || p == nil {
		return m
	}
	c := *p
	return &c
}
