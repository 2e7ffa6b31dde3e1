package store

import (
	"context"
	"fmt"
	"time"
)

// RetainedMessage is a retained MQTT message the embedded broker keeps
// across restarts.
type RetainedMessage struct {
	Topic   string
	Payload []byte
	QoS     byte
	Created time.Time
}

// SaveRetained stores (or replaces) the retained message of a topic.
func (s *Store) SaveRetained(ctx context.Context, m RetainedMessage) error {
	_, err := s.db.ExecContext(ctx, `
		INSERT INTO mqtt_retained (topic, payload, qos, created_ms) VALUES (?, ?, ?, ?)
		ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos, created_ms = excluded.created_ms`,
		m.Topic, m.Payload, int(m.QoS), ms(m.Created))
	if err != nil {
		return fmt.Errorf("save retained message of %s: %w", m.Topic, err)
	}
	return nil
}

// DeleteRetained forgets the retained message of a topic.
func (s *Store) DeleteRetained(ctx context.Context, topic string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM mqtt_retained WHERE topic = ?`, topic); err != nil {
		return fmt.Errorf("delete retained message of %s: %w", topic, err)
	}
	return nil
}

// RetainedMessages returns every stored retained message, sorted by topic.
func (s *Store) RetainedMessages(ctx context.Context) ([]RetainedMessage, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT topic, payload, qos, created_ms FROM mqtt_retained ORDER BY topic`)
	if err != nil {
		return nil, fmt.Errorf("load retained messages: %w", err)
	}
	defer rows.Close()
	var out []RetainedMessage
	for rows.Next() {
		var m RetainedMessage
		var qos int
		var created int64
		if err := rows.Scan(&m.Topic, &m.Payload, &qos, &created); err != nil {
			return nil, fmt.Errorf("load retained messages: %w", err)
		}
		m.QoS, m.Created = byte(qos), fromMS(created)
		out = append(out, m)
	}
	return out, rows.Err()
}
