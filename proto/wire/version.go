// Package wire holds the Edgefleet MQTT protocol around the generated
// messages in proto/edgefleetv1: the topic tree, the envelope, the payload
// cap, and the protocol version.
package wire

// ProtocolVersion is the version of the wire contract this code speaks. It
// goes up by one for every change a peer may need to know about; peers accept
// any version from MinProtocolVersion up to their own and ignore fields they
// do not know (protobuf rules).
//
// Changelog:
//
//	1 (2026-11-26): first version. Envelope with hello, state, presence,
//	  event, telemetry batch, telemetry ack, signed desired state and command
//	  bodies; topics under ef/v1/dev/{id}/.
//	  2026-11-26, additive: SlotAssignment.health (HealthPolicy),
//	  SlotState.healthy and SlotState.rollout_id.
//	  2026-11-27, additive: SlotAssignment.shadow (ShadowPolicy),
//	  SlotState.shadow (ShadowState).
//	  2026-11-27, additive: key rotation: topic ef/v1/dev/{id}/keys
//	  (controller -> agent, retained) with Envelope.keys
//	  (KeyAnnouncements); agents that do not know it never subscribe.
//	  2026-11-27, additive: agent self-update: DesiredState.agent_release
//	  (AgentRelease), ReportedState.agent_update and Hello.agent_update
//	  (AgentUpdateState), EventKind AGENT_RESTARTING; an agent that does
//	  not know agent_release ignores it and keeps its version.
//	  2026-11-27, additive: telemetry aggregates and raw samples
//	  (TelemetryRecord.aggregate, .sample), ReportedState
//	  .spool_dropped_by_class, SlotAssignment.sample_rate, and
//	  Envelope.telemetry_zstd (a TelemetryBatch compressed with zstd,
//	  decompressed size capped at MaxDecompressed) sent by agents with the
//	  hello capability "telemetry-zstd" while the controller acknowledges
//	  them (an older controller drops them unacknowledged, and the agent
//	  falls back to plain batches on that connection).
const ProtocolVersion = 1

// MinProtocolVersion is the oldest protocol version this code accepts.
const MinProtocolVersion = 1

// MaxPayload caps the size of one MQTT payload. It is checked before any
// decoding; a bigger payload is dropped and counted by the receiver.
// Telemetry batches are sized by the agent to stay well below it.
const MaxPayload = 256 << 10
