package broker

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/proto/wire"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// RetainStore keeps retained messages; *store.Store implements it.
type RetainStore interface {
	// ApplyRetained saves, or for an empty payload deletes, messages in
	// one transaction.
	ApplyRetained(ctx context.Context, msgs []store.RetainedMessage) error
	RetainedMessages(ctx context.Context) ([]store.RetainedMessage, error)
}

// storeTimeout bounds one database call from inside the broker: hooks run
// on the publishing client's goroutine and have no context of their own.
const storeTimeout = 10 * time.Second

// retainHook is a mochi storage hook that persists only the retained
// messages of desired-state topics (see the package doc for why).
//
// Mochi calls OnRetainMessage on the publishing client's goroutine before
// it acknowledges the publish, so writing there would cost the controller
// one synchronous database commit per desired state: a rollout wave of
// thousands of devices would crawl. The hook queues instead, keeping the
// newest message per topic, and the broker's Run writes the queue in one
// transaction per batch. What a crash loses is at most the last batch, and
// that loss is covered: the documents themselves were committed to the
// store before they were published, and the controller re-publishes a
// device's desired state when its hello reports an older generation.
type retainHook struct {
	mqtt.HookBase
	store RetainStore
	log   *slog.Logger

	mu      sync.Mutex
	pending map[string]store.RetainedMessage
	order   []string
	wake    chan struct{}
}

func newRetainHook(st RetainStore, log *slog.Logger) *retainHook {
	return &retainHook{store: st, log: log, pending: map[string]store.RetainedMessage{}, wake: make(chan struct{}, 1)}
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
	created := time.Unix(pk.Created, 0)
	if pk.Created == 0 {
		created = time.Now()
	}
	m := store.RetainedMessage{Topic: pk.TopicName, Payload: bytes.Clone(pk.Payload), QoS: pk.FixedHeader.Qos, Created: created}
	h.mu.Lock()
	if _, ok := h.pending[m.Topic]; !ok {
		h.order = append(h.order, m.Topic)
	}
	h.pending[m.Topic] = m
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// run writes queued messages until ctx ends, then writes what is left.
func (h *retainHook) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			h.flush()
			return
		case <-h.wake:
			h.flush()
		}
	}
}

func (h *retainHook) flush() {
	h.mu.Lock()
	batch := make([]store.RetainedMessage, 0, len(h.order))
	for _, t := range h.order {
		batch = append(batch, h.pending[t])
	}
	h.pending, h.order = map[string]store.RetainedMessage{}, nil
	h.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if err := h.store.ApplyRetained(ctx, batch); err != nil {
		// The messages are still retained in memory; only a restart before
		// the next publish of these topics loses them, and the controller
		// re-publishes desired states a device is missing when it says hello.
		h.log.Error("persist retained messages", "messages", len(batch), "err", err)
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
