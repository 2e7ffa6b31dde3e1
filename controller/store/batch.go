package store

import (
	"context"
	"database/sql"
	"time"
)

// DeviceReport is one device's reported state, for UpdateReports.
type DeviceReport struct {
	ID     string
	At     time.Time
	Report Report
}

// UpsertHellos is UpsertHello for many devices in one transaction: a
// fleet's worth of hellos after a broker restart, or a benchmark's fleet,
// without a disk sync per device.
func (s *Store) UpsertHellos(ctx context.Context, hs []Hello) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		for _, h := range hs {
			if err := s.upsertHello(ctx, tx, h); err != nil {
				return err
			}
		}
		return nil
	})
}

// UpdateReports is UpdateReport for many devices in one transaction.
func (s *Store) UpdateReports(ctx context.Context, rs []DeviceReport) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		for _, r := range rs {
			if err := s.ensureDevice(ctx, tx, r.ID, r.At); err != nil {
				return err
			}
			if err := s.applyReport(ctx, tx, r.ID, &r.Report); err != nil {
				return err
			}
		}
		return nil
	})
}
