package broker

import (
	"bytes"
	"context"
	"log/slog"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/wire"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// RetainStore keeps retained messages; *store.Store implements it.
type RetainStore interface {
	SaveRetained(ctx context.Context, m store.RetainedMessage) error
	DeleteRetained(ctx context.Context, topic string) error
	RetainedMessages(ctx context.Context) ([]store.RetainedMessage, error)
}

// storeTimeout bounds one database call from inside the broker: hooks run
// on the publishing client's goroutine and have no context of their own.
const storeTimeout = 5 * time.Second

// retainHook is a mochi storage hook that persists only the retained
// messages of desired-state topics (see the package doc for why).
type retainHook struct {
	mqtt.HookBase
	store RetainStore
	log   *slog.Logger
}

func (h *retainHook) ID() string { return "edgefleet-retained-desired" }

func (h *retainHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnRetainMessage, mqtt.StoredRetainedMessages}, []byte{b})
}

// persisted reports whether the retained message of topic is kept.
func persisted(topic string) bool {
	_, kind, err := wire.ParseTopic(topic)
	return err == nil && kind == wire.KindDesired
}

func (h *retainHook) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, r int64) {
	if !persisted(pk.TopicName) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	var err error
	if len(pk.Payload) == 0 {
		err = h.store.DeleteRetained(ctx, pk.TopicName)
	} else {
		created := time.Unix(pk.Created, 0)
		if pk.Created == 0 {
			created = time.Now()
		}
		err = h.store.SaveRetained(ctx, store.RetainedMessage{
			Topic:   pk.TopicName,
			Payload: bytes.Clone(pk.Payload),
			QoS:     pk.FixedHeader.Qos,
			Created: created,
		})
	}
	if err != nil {
		// The message is still retained in memory; only a restart before
		// the next publish of this topic loses it, and the controller
		// re-publishes desired states a device is missing when it says hello.
		h.log.Error("persist retained message", "topic", pk.TopicName, "err", err)
	}
}

func (h *retainHook) StoredRetainedMessages() ([]storage.Message, error) {
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	msgs, err := h.store.RetainedMessages(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]storage.Message, 0, len(msgs))
	for _, m := range msgs {
		if !persisted(m.Topic) {
			continue
		}
		out = append(out, storage.Message{
			ID:        "retained_" + m.Topic,
			T:         storage.RetainedKey,
			TopicName: m.Topic,
			Payload:   m.Payload,
			Created:   m.Created.Unix(),
			FixedHeader: packets.FixedHeader{
				Type:   packets.Publish,
				Qos:    m.QoS,
				Retain: true,
			},
		})
	}
	h.log.Debug("restored retained messages", "count", len(out))
	return out, nil
}
