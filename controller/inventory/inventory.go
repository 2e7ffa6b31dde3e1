// Package inventory keeps the controller's picture of the fleet up to date
// from what devices say: hello (identity, labels, agent version, what runs),
// retained state (the reported state), retained presence (online, or the
// last will's offline) and deployment events.
//
// A device that says hello while reporting a desired-state generation below
// the one stored for it missed its desired state (say, a broker without
// persistence lost the retained message); the inventory asks for a
// re-publish. A device that talks while the store has no hello of it (the
// hello was lost) is sent the resync command, which makes it say hello
// again (WithResync, resync.go).
//
// The controller feeds it through a group commit (Submit and Run, in
// writer.go): the link's worker queues each message and goes on reading,
// and one writer stores every message queued so far in one transaction, in
// arrival order, and only then runs what depends on them (the re-publish
// check, the caller's follow-ups). The one-message methods (Hello, State,
// Presence, Event) store each in its own transaction.
package inventory

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// Store is what the inventory needs from the controller's store.
type Store interface {
	UpsertHello(ctx context.Context, h store.Hello) error
	UpdateReport(ctx context.Context, id string, at time.Time, r store.Report) error
	SetPresence(ctx context.Context, id string, online bool, at time.Time) error
	AppendEvent(ctx context.Context, e store.Event, seen time.Time) error
	DesiredState(ctx context.Context, id string) (store.Desired, error)
	ApplyDeviceUpdates(ctx context.Context, us []store.DeviceUpdate) ([]store.DeviceUpdateResult, error)
}

// Republisher re-sends a device's stored desired state.
type Republisher interface {
	// Republish publishes the stored desired state of device id again. It
	// must not wait for the broker: it runs on the message worker.
	Republish(ctx context.Context, id string) error
}

// Inventory applies device messages to the store.
type Inventory struct {
	store    Store
	director Republisher
	log      *slog.Logger
	w        writer
	rs       *resyncer
}

// New returns an inventory. director may be nil (no re-publish on hello).
func New(st Store, director Republisher, log *slog.Logger, opts ...Option) *Inventory {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o := options(opts)
	return &Inventory{store: st, director: director, log: log, w: newWriter(o), rs: newResyncer(o, o.metrics, log)}
}

// Hello records a device's hello and re-publishes its desired state if the
// device reports an older generation than the one stored.
func (inv *Inventory) Hello(ctx context.Context, id string, at time.Time, h *pb.Hello) error {
	rec, err := helloRecord(id, at, h)
	if err != nil {
		return err
	}
	if err := inv.store.UpsertHello(ctx, rec); err != nil {
		return fmt.Errorf("hello from %s: %w", id, err)
	}
	inv.rs.helloStored(id)
	inv.logHello(id, h)
	if inv.director == nil {
		return nil
	}
	want, err := inv.store.DesiredState(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("hello from %s: %w", id, err)
	}
	return inv.republishIfBehind(ctx, id, h, want.Generation)
}

// helloRecord turns a hello into what the store keeps.
func helloRecord(id string, at time.Time, h *pb.Hello) (store.Hello, error) {
	rec := store.Hello{
		ID:           id,
		Labels:       h.GetLabels(),
		AgentVersion: h.GetAgentVersion(),
		OS:           h.GetOs(),
		Arch:         h.GetArch(),
		At:           at,
	}
	if st := h.GetState(); st != nil {
		r, err := ReportFrom(st)
		if err != nil {
			return store.Hello{}, fmt.Errorf("hello from %s: %w", id, err)
		}
		if r.AgentVersion == "" {
			r.AgentVersion = h.GetAgentVersion()
		}
		rec.Report = &r
	}
	return rec, nil
}

func (inv *Inventory) logHello(id string, h *pb.Hello) {
	inv.log.Info("device hello", "device", id, "agent", h.GetAgentVersion(), "labels", len(h.GetLabels()),
		"reported_generation", h.GetState().GetDesiredGeneration())
}

// republishIfBehind re-publishes the desired state of a device whose hello
// reports a generation below want, the stored one.
func (inv *Inventory) republishIfBehind(ctx context.Context, id string, h *pb.Hello, want uint64) error {
	if inv.director == nil {
		return nil
	}
	if have := h.GetState().GetDesiredGeneration(); have < want {
		inv.log.Info("device is behind its desired state; re-publishing", "device", id, "reported_generation", have, "generation", want)
		if err := inv.director.Republish(ctx, id); err != nil {
			return fmt.Errorf("hello from %s: re-publish desired state: %w", id, err)
		}
	}
	return nil
}

// State records a device's reported state.
func (inv *Inventory) State(ctx context.Context, id string, at time.Time, s *pb.ReportedState) error {
	r, err := ReportFrom(s)
	if err != nil {
		return fmt.Errorf("state of %s: %w", id, err)
	}
	if err := inv.store.UpdateReport(ctx, id, at, r); err != nil {
		return fmt.Errorf("state of %s: %w", id, err)
	}
	return nil
}

// Presence records whether a device is connected.
func (inv *Inventory) Presence(ctx context.Context, id string, at time.Time, p *pb.Presence) error {
	if err := inv.store.SetPresence(ctx, id, p.GetOnline(), at); err != nil {
		return fmt.Errorf("presence of %s: %w", id, err)
	}
	inv.log.Debug("device presence", "device", id, "online", p.GetOnline())
	return nil
}

// Event appends a device's deployment event.
func (inv *Inventory) Event(ctx context.Context, id string, at time.Time, e *pb.Event) error {
	ev := EventFrom(id, e, at)
	if err := inv.store.AppendEvent(ctx, ev, at); err != nil {
		return fmt.Errorf("event of %s: %w", id, err)
	}
	inv.logEvent(ctx, &ev, e.GetKind())
	return nil
}

func (inv *Inventory) logEvent(ctx context.Context, ev *store.Event, kind pb.EventKind) {
	lvl := slog.LevelInfo
	if kind == pb.EventKind_EVENT_KIND_FAILED || kind == pb.EventKind_EVENT_KIND_REFUSED {
		lvl = slog.LevelWarn
	}
	inv.log.Log(ctx, lvl, "device event", "device", ev.DeviceID, "kind", ev.Kind, "slot", ev.Slot, "model", ev.Model, "version", ev.Version, "detail", ev.Detail)
}

// ReportFrom turns a reported state into the columns the store indexes,
// keeping the message itself serialized.
func ReportFrom(s *pb.ReportedState) (store.Report, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s)
	if err != nil {
		return store.Report{}, fmt.Errorf("encode reported state: %w", err)
	}
	return store.Report{
		State:              b,
		Health:             HealthName(s.GetHealth()),
		ReportedGeneration: s.GetDesiredGeneration(),
		SpoolDepth:         s.GetSpoolDepth(),
		AgentVersion:       s.GetAgentVersion(),
	}, nil
}

// HealthName is the API's name of a health value: ok, degraded, failing or
// unknown.
func HealthName(h pb.Health) string {
	switch h {
	case pb.Health_HEALTH_OK:
		return store.HealthOK
	case pb.Health_HEALTH_DEGRADED:
		return store.HealthDegraded
	case pb.Health_HEALTH_FAILING:
		return store.HealthFailing
	}
	return store.HealthUnknown
}

// EventKindName is the API's name of an event kind: "downloading",
// "rolled-back", ... and "unknown" for a kind this controller does not know.
func EventKindName(k pb.EventKind) string {
	name, ok := strings.CutPrefix(k.String(), "EVENT_KIND_")
	if !ok || k == pb.EventKind_EVENT_KIND_UNSPECIFIED {
		return "unknown"
	}
	return strings.ReplaceAll(strings.ToLower(name), "_", "-")
}

// EventFrom converts a wire event of device id. An event without its own
// time gets at.
func EventFrom(id string, e *pb.Event, at time.Time) store.Event {
	when := at
	if ms := e.GetAtUnixMs(); ms > 0 {
		when = time.UnixMilli(ms)
	}
	return store.Event{
		DeviceID:   id,
		Kind:       EventKindName(e.GetKind()),
		Slot:       e.GetSlot(),
		Model:      e.GetModel().GetName(),
		Version:    e.GetModel().GetVersion(),
		Generation: e.GetGeneration(),
		RolloutID:  e.GetRolloutId(),
		Detail:     e.GetDetail(),
		At:         when,
	}
}
