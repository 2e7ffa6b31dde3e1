package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Kinds of telemetry record.
const (
	RecordInference = "inference"
	RecordEvent     = "event"
	// RecordOther is a record whose body this controller does not know
	// (a newer agent); it is stored for dedupe and acked, so the agent can
	// free its spool.
	RecordOther = "other"
)

// TelemetryRecord is one spooled record of a device.
type TelemetryRecord struct {
	Seq       uint64
	Kind      string
	Model     string
	Version   string
	At        time.Time
	LatencyUS uint32
	Error     string
	// Event is set for RecordEvent; it is also appended to the device's
	// events the first time the record is stored.
	Event *Event
}

// TelemetryResult says what StoreTelemetry did.
type TelemetryResult struct {
	// Inserted counts records stored by this call; the others of the batch
	// were already stored (duplicates).
	Inserted int
	// Duplicates counts records that were already stored.
	Duplicates int
}

// StoreTelemetry stores a batch of one device's records in one transaction,
// ignoring records already stored under the same (device, epoch, seq). When
// it returns nil, every record of the batch is durably stored.
func (s *Store) StoreTelemetry(ctx context.Context, id, epoch string, seen time.Time, recs []TelemetryRecord) (TelemetryResult, error) {
	var res TelemetryResult
	err := s.tx(ctx, func(tx *sql.Tx) error {
		res = TelemetryResult{}
		if err := s.ensureDevice(ctx, tx, id, seen); err != nil {
			return err
		}
		// Rows go in without the caller's cancellation: with a cancellable
		// context the driver starts a watcher goroutine per statement,
		// which costs more than the insert. The transaction still ends
		// with ctx (BeginTx watches it).
		rowCtx := context.WithoutCancel(ctx)
		stmt, err := tx.PrepareContext(rowCtx, `
			INSERT OR IGNORE INTO telemetry (device_id, spool_epoch, seq, kind, model, version, at_ms, latency_us, error, received_ms)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		var inferences, errs int64
		now := s.now().UnixMilli()
		for _, r := range recs {
			// Sequence numbers are stored as SQLite's signed 64-bit
			// integers; the conversion is reversible.
			out, err := stmt.ExecContext(rowCtx, id, epoch, int64(r.Seq), r.Kind, r.Model, r.Version, ms(r.At), r.LatencyUS, r.Error, now)
			if err != nil {
				return fmt.Errorf("device %s: store telemetry seq %d: %w", id, r.Seq, err)
			}
			n, err := out.RowsAffected()
			if err != nil {
				return err
			}
			if n == 0 {
				res.Duplicates++
				continue
			}
			res.Inserted++
			switch r.Kind {
			case RecordInference:
				inferences++
				if r.Error != "" {
					errs++
				}
			case RecordEvent:
				if r.Event != nil {
					e := *r.Event
					e.DeviceID = id
					if err := insertEvent(ctx, tx, e); err != nil {
						return err
					}
				}
			}
		}
		if inferences > 0 {
			if _, err := tx.ExecContext(ctx, `UPDATE devices SET inferences = inferences + ?, inference_errors = inference_errors + ? WHERE id = ?`,
				inferences, errs, id); err != nil {
				return fmt.Errorf("device %s: count inferences: %w", id, err)
			}
		}
		return nil
	})
	if err != nil {
		return TelemetryResult{}, err
	}
	return res, nil
}

// TelemetryCount returns how many telemetry records of a device are stored.
func (s *Store) TelemetryCount(ctx context.Context, id string) (int64, error) {
	var n int64
	err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM telemetry WHERE device_id = ?`, id).Scan(&n)
	return n, err
}
