package controller

import (
	"context"
	"time"

	"github.com/mochi-mqtt/server/v2/system"

	"github.com/edgefleet/edgefleet/controller/metrics"
)

type brokerStats = system.Info

// registerMetrics adds the gauges read at scrape time: rollouts by phase
// and the embedded broker's counters. The telemetry ingest, the link and
// the drops tracker register their own.
func (c *Controller) registerMetrics() {
	c.metrics.GaugeVecFunc("edgefleet_controller_rollouts", "Rollouts by phase.", func() []metrics.Sample {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		ros, err := c.store.Rollouts(ctx, false)
		if err != nil {
			return nil
		}
		by := map[string]int{}
		for _, r := range ros {
			by[r.Phase]++
		}
		out := make([]metrics.Sample, 0, len(by))
		for p, n := range by {
			out = append(out, metrics.Sample{Labels: []string{"phase", p}, Value: float64(n)})
		}
		return out
	})
	if c.broker == nil {
		return
	}
	b := c.broker
	for _, g := range []struct {
		name, help string
		get        func(*brokerStats) int64
	}{
		{"edgefleet_controller_broker_clients_connected", "Clients connected to the embedded broker.", func(s *brokerStats) int64 { return s.ClientsConnected }},
		{"edgefleet_controller_broker_messages_received", "PUBLISH messages the embedded broker received since it started.", func(s *brokerStats) int64 { return s.MessagesReceived }},
		{"edgefleet_controller_broker_messages_sent", "PUBLISH messages the embedded broker sent since it started.", func(s *brokerStats) int64 { return s.MessagesSent }},
		{"edgefleet_controller_broker_messages_dropped", "Messages the embedded broker dropped for slow subscribers since it started.", func(s *brokerStats) int64 { return s.MessagesDropped }},
		{"edgefleet_controller_broker_inflight", "QoS 1/2 messages in flight in the embedded broker.", func(s *brokerStats) int64 { return s.Inflight }},
		{"edgefleet_controller_broker_inflight_dropped", "In-flight messages the embedded broker dropped since it started.", func(s *brokerStats) int64 { return s.InflightDropped }},
		{"edgefleet_controller_broker_retained", "Retained messages held by the embedded broker.", func(s *brokerStats) int64 { return s.Retained }},
		{"edgefleet_controller_broker_bytes_received", "Bytes the embedded broker received since it started.", func(s *brokerStats) int64 { return s.BytesReceived }},
	} {
		c.metrics.GaugeFunc(g.name, g.help, func() float64 { return float64(g.get(b.Stats())) })
	}
}
