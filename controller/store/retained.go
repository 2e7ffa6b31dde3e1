package store

import (
	"context"
	"database/sql"
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

// ApplyRetained saves (or, for an empty payload, deletes) many retained
// messages in one transaction, in order.
func (s *Store) ApplyRetained(ctx context.Context, msgs []RetainedMessage) error {
	if len(msgs) == 0 {
		return nil
	}
	return s.tx(ctx, func(tx *sql.Tx) error {
		save, err := tx.PrepareContext(ctx, `
			INSERT INTO mqtt_retained (topic, payload, qos, created_ms) VALUES (?, ?, ?, ?)
			ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos, created_ms = excluded.created_ms`)
		if err != nil {
			return err
		}
		defer save.Close()
		del, err := tx.PrepareContext(ctx, `DELETE FROM mqtt_retained WHERE topic = ?`)
		if err != nil {
			return err
		}
		defer del.Close()
		for _, m := range msgs {
			if len(m.Payload) == 0 {
				_, err = del.ExecContext(ctx, m.Topic)
			} else {
				_, err = save.ExecContext(ctx, m.Topic, m.Payload, int(m.QoS), ms(m.Created))
			}
			if err != nil {
				return fmt.Errorf("retained message of %s: %w", m.Topic, err)
			}
		}
		return nil
	})
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
