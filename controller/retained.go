package controller

import (
	"context"
	"fmt"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// desiredRetained is what the embedded broker keeps across restarts: the
// devices' desired states, read back from the store, whose desired_states
// table already holds every device's current document, committed before
// it was published. The broker's retained messages of the desired topics
// are rebuilt from it on start; nothing is written per publish, which
// would be a second write of every document a rollout wave issues.
//
// A document committed but never published (the controller died between
// the two) is retained too after the restart: it is the one the device
// must get, and the agent ignores a generation it has already accepted.
type desiredRetained struct{ st *store.Store }

// ApplyRetained does nothing: the documents are in the store already.
func (desiredRetained) ApplyRetained(context.Context, []store.RetainedMessage) error { return nil }

// RetainedMessages returns every device's desired state, sealed as it is
// published.
func (d desiredRetained) RetainedMessages(ctx context.Context) ([]store.RetainedMessage, error) {
	docs, err := d.st.DesiredDocs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]store.RetainedMessage, 0, len(docs))
	for _, doc := range docs {
		var signed pb.SignedDesiredState
		if err := proto.Unmarshal(doc.Doc, &signed); err != nil {
			return nil, fmt.Errorf("stored desired state of %s generation %d is corrupt: %w", doc.DeviceID, doc.Generation, err)
		}
		payload, err := wire.Seal(doc.DeviceID, doc.IssuedAt, &signed)
		if err != nil {
			return nil, fmt.Errorf("desired state of %s: %w", doc.DeviceID, err)
		}
		out = append(out, store.RetainedMessage{Topic: wire.Topic(doc.DeviceID, wire.KindDesired), Payload: payload, QoS: 1, Created: doc.IssuedAt})
	}
	return out, nil
}
